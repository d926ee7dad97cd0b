"""Inference: test pairs with matching names, resumable output, own photos, clear errors, and the demo."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import infer_xmdpt
from configs import load_config, model_arch
from data.deepfashion import PairDataset
from data.synthetic import make_synthetic
from models import XMDPT, save_safetensors
from models.encoders import build_encoders

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.hidden_size=32", "model.depth=3", "model.num_heads=2", "data.cache=null"]
SIZE = load_config(ROOT / "configs/demo.yaml")["data"]["size"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("infer")
    make_synthetic(tmp / "data", num_identities=8, poses_per_identity=3, size=SIZE, seed=1)
    cfg = load_config(ROOT / "configs/demo.yaml", TINY + [f"data.root={tmp / 'data'}"])
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    encoders = build_encoders(cfg["encoders"])
    torch.manual_seed(0)
    model = XMDPT(**model_arch(cfg, encoders.pose_dim, encoders.image_dim))
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    save_safetensors(model, tmp / "tiny.safetensors", inference_only=True)
    return tmp, cfg


def run(setup, out, *extra):
    tmp, _ = setup
    infer_xmdpt.main(["--config", str(tmp / "cfg.yaml"), "--ckpt", str(tmp / "tiny.safetensors"),
                      "--out", str(out), "--steps", "2", *extra])


def test_pairs_have_matching_names_and_resume(setup, tmp_path):
    tmp, cfg = setup
    run(setup, tmp_path, "--limit", "3", "--batch-size", "2")
    pairs = PairDataset(cfg["data"]["root"], SIZE, "test")
    names = sorted(f"{pairs.pair_name(i)}.png" for i in range(3))
    for folder in ("generated", "target", "source", "grids"):
        assert sorted(p.name for p in (tmp_path / folder).iterdir()) == names
    image = Image.open(tmp_path / "generated" / names[0])
    assert image.size == (SIZE, SIZE) and image.mode == "RGB"
    stamp = (tmp_path / "generated" / names[0]).stat().st_mtime_ns
    run(setup, tmp_path, "--limit", "3")
    assert (tmp_path / "generated" / names[0]).stat().st_mtime_ns == stamp
    run(setup, tmp_path, "--limit", "3", "--overwrite")
    assert (tmp_path / "generated" / names[0]).stat().st_mtime_ns != stamp


def test_outputs_do_not_depend_on_batch_size(setup, tmp_path):
    run(setup, tmp_path / "a", "--limit", "3", "--batch-size", "1", "--no-grids")
    run(setup, tmp_path / "b", "--limit", "3", "--batch-size", "3", "--no-grids")
    for path in (tmp_path / "a" / "generated").iterdir():
        a = np.asarray(Image.open(path), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "b" / "generated" / path.name), dtype=np.int16)
        assert np.abs(a - b).max() <= 1
    assert not (tmp_path / "a" / "grids").exists()


def test_dpm_solver_option(setup, tmp_path):
    run(setup, tmp_path, "--limit", "1", "--sampler", "dpm++")
    assert len(list((tmp_path / "generated").iterdir())) == 1


@pytest.mark.parametrize("override, difference", [("model.hidden_size=64", "hidden_size: 32 in the checkpoint, 64"),
                                                   ("model.prediction=eps", "prediction: v in the checkpoint, eps")])
def test_checkpoint_of_another_architecture_is_refused(setup, tmp_path, override, difference):
    tmp, cfg = setup
    assert cfg["model"]["prediction"] == "v"
    cfg = load_config(ROOT / "configs/demo.yaml", TINY + [override, f"data.root={tmp / 'data'}"])
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match=rf"--ckpt .*tiny.safetensors does not fit.*\n.*{difference} in the config"):
        infer_xmdpt.main(["--config", str(tmp_path / "other.yaml"), "--ckpt", str(tmp / "tiny.safetensors"),
                          "--out", str(tmp_path / "out")])


def test_own_photo_with_a_keypoint_file(setup, tmp_path):
    from skimage.data import astronaut
    tmp, _ = setup
    Image.fromarray(astronaut()).save(tmp_path / "astronaut.png")
    pose = next((tmp / "data" / "pose").rglob("*.txt"))
    run(setup, tmp_path / "out", "--source", str(tmp_path / "astronaut.png"), "--target-pose", str(pose))
    out = tmp_path / "out" / "generated" / f"astronaut_2_{pose.stem}.png"
    assert Image.open(out).size == (SIZE, SIZE)
    assert Image.open(tmp_path / "out" / "grids" / out.name).size == (3 * SIZE, SIZE)
    with pytest.raises(SystemExit, match="exists"):
        run(setup, tmp_path / "out", "--source", str(tmp_path / "astronaut.png"), "--target-pose", str(pose))


def test_unreadable_photo_is_named(setup, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    pose = next((setup[0] / "data" / "pose").rglob("*.txt"))
    with pytest.raises(ValueError, match="broken.jpg"):
        run(setup, tmp_path / "out", "--source", str(tmp_path / "broken.jpg"), "--target-pose", str(pose))


def test_target_pose_with_too_few_joints_is_named(setup, tmp_path):
    from skimage.data import astronaut
    Image.fromarray(astronaut()).save(tmp_path / "astronaut.png")
    (tmp_path / "sparse.txt").write_text("100 50\n" + "-1 -1\n" * 17)
    with pytest.raises(ValueError, match="sparse.txt: only 1 of 18 joints"):
        run(setup, tmp_path / "out", "--source", str(tmp_path / "astronaut.png"), "--target-pose",
            str(tmp_path / "sparse.txt"))


def test_pose_from_another_photo(setup, tmp_path):
    pytest.importorskip("mediapipe", reason="MediaPipe Pose is the optional extra requirements-photo.txt")
    from skimage.data import astronaut
    Image.fromarray(astronaut()).save(tmp_path / "astronaut.png")
    Image.fromarray(astronaut()[:, ::-1].copy()).save(tmp_path / "mirrored.png")
    run(setup, tmp_path / "out", "--source", str(tmp_path / "astronaut.png"),
        "--target-pose-from", str(tmp_path / "mirrored.png"))
    assert (tmp_path / "out" / "generated" / "astronaut_2_mirrored.png").is_file()


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    """The README's main command: the bundled checkpoint on the synthetic test pairs, with both scores."""
    infer_xmdpt.main(["--out", str(tmp_path)])
    printed = capsys.readouterr().out
    generated, source = map(float, re.search(r"generated ([0-9.]+) / .*sources ([0-9.]+) /", printed).groups())
    assert source < generated <= 1
    names = sorted(p.name for p in (tmp_path / "generated").iterdir())
    assert len(names) == 100
    for folder in ("target", "source", "grids"):
        assert sorted(p.name for p in (tmp_path / folder).iterdir()) == names
