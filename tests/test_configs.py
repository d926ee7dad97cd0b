"""configs/: each ablation config differs from the X-MDPT-S/2 recipe in exactly what its name says."""
from pathlib import Path

import pytest

from configs import load_config, model_arch

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# DINOv2 token widths (Oquab et al., 2023, table of architectures).
WIDTHS = {"vits14": 384, "vitb14": 768, "vitl14": 1024, "vitg14": 1536}

ABLATIONS = {
    "dit": {"mipnet": "none"},
    "mdt": {"mipnet": "self"},
    "cross": {"mipnet": "cross"},
    "cross_self": {"mipnet": "cross-self"},
    "mask_0.5": {"mask_ratio": 0.5},
    "mask_0.7": {"mask_ratio": 0.7},
    "agg_local": {"aggregation": "local"},
    "agg_global": {"aggregation": "global"},
    "agg_add": {"aggregation": "add"},
    "pose_vits14": {"pose_dim": 384},
    "pose_vitl14": {"pose_dim": 1024},
    "image_vitb14": {"image_dim": 768},
    "image_vitl14": {"image_dim": 1024},
}


def arch_of(cfg):
    return model_arch(cfg, WIDTHS[cfg["encoders"]["pose"]["arch"]], WIDTHS[cfg["encoders"]["image"]["arch"]])


def test_every_ablation_config_is_listed():
    assert sorted(p.stem for p in (CONFIGS / "ablations").glob("*.yaml")) == sorted(ABLATIONS)


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_ablation_changes_only_its_switch(name):
    recipe = load_config(CONFIGS / "xmdpt_s.yaml")
    ablation = load_config(CONFIGS / "ablations" / f"{name}.yaml")
    base, changed = arch_of(recipe), arch_of(ablation)
    assert {k: v for k, v in changed.items() if base[k] != v} == ABLATIONS[name]
    assert {k: v for k, v in ablation.items() if k != "model" and k != "encoders"} == \
        {k: v for k, v in recipe.items() if k != "model" and k != "encoders"}
    assert base == dict(arch_of(recipe), mipnet="self-cross", aggregation="mlp", mask_ratio=0.3, pose_dim=768,
                        image_dim=1536, hidden_size=384, depth=12, num_heads=6)
