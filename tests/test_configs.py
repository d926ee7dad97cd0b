"""configs/: the model section is an XMDPTConfig; each ablation config differs from the X-MDPT-S/2 recipe in
exactly what its name says."""
from pathlib import Path

import pytest

from configs import load_config, model_config
from models import XMDPT_CONFIGS, XMDPTConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

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
    return dict(model_config(cfg))


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


def test_model_section_maps_onto_the_config(tmp_path):
    """preset, then every field the section names; the DINOv2 widths follow the encoders; unknown keys, bad
    values and widths that contradict the encoders are refused, naming them."""
    cfg = load_config(CONFIGS / "xmdpt_l_512.yaml")
    assert model_config(cfg) == XMDPTConfig(**dict(XMDPT_CONFIGS["XMDPT-L/2"], input_size=64))
    demo = load_config(CONFIGS / "demo.yaml")
    assert {k: v for k, v in dict(model_config(demo)).items() if k in demo["model"]} == \
        {k: v for k, v in demo["model"].items() if k != "preset"}
    for override, message in [("model.hidden_sise=64", r"unknown model keys \['hidden_sise'\]"),
                              ("model.preset=XMDPT-M/2", "model.preset 'XMDPT-M/2' is not one of"),
                              ("model.num_heads=7", "hidden_size .384. must be a multiple of num_heads .7."),
                              ("model.pose_dim=1024", "model.pose_dim 1024 does not match encoders.pose.dinov2 "
                                                      "vitb14, which gives 768"),
                              ("encoders.image.dinov2=vitq14", "unknown DINOv2 variant 'vitq14'"),
                              ("model.input_size=64", r"model.input_size 64 does not match data.size 256 through "
                                                      r"encoders.first_stage \(vae: 8x down, 4 channels\), which "
                                                      r"gives 32; leave model.input_size out"),
                              ("model.in_channels=3", "model.in_channels 3 does not match data.size 256 through "
                                                      "encoders.first_stage .*which gives 4"),
                              ("data.size=250", "data.size 250 is not a multiple of 8, the downsampling of "
                                                "encoders.first_stage .vae.")]:
        with pytest.raises(ValueError, match=message):
            load_config(CONFIGS / "xmdpt_s.yaml", [override])


def test_the_latent_grid_follows_the_image_size_and_the_first_stage():
    """input_size and in_channels are derived: 256 and 512 pixels through the SD VAE (8x, 4 channels) give 32 and
    64; the demo's 32 pixels through the identity keep 32x32x3; a random test VAE says its own."""
    grid = lambda path, *overrides: (lambda c: (c.input_size, c.in_channels))(
        model_config(load_config(CONFIGS / path, list(overrides))))
    assert grid("xmdpt_s.yaml") == (32, 4) and grid("xmdpt_s.yaml", "data.size=512") == (64, 4)
    assert grid("xmdpt_l_512.yaml") == (64, 4) and grid("demo.yaml") == (32, 3)
    small_vae = ("encoders.first_stage={type: vae, path: null, random: {block_out_channels: [32, 64], "
                 "latent_channels: 2}}")
    assert grid("xmdpt_s.yaml", small_vae) == (128, 2)
    assert grid("xmdpt_s.yaml", "encoders.first_stage.downsample=16", "encoders.first_stage.latent_channels=16") \
        == (16, 16)
