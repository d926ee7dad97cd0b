"""Inference: test pairs with matching names, resumable output, own photos, clear errors, and the demo."""
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

import infer_xmdpt
from configs import load_config, model_config
from conftest import optional
from data.deepfashion import PairDataset
from data.photo import _pose_solution
from data.synthetic import make_synthetic
from inference import Pipeline
from inference.pairs import to_uint8
from models import XMDPT, export
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
    torch.manual_seed(0)
    model = XMDPT(model_config(cfg))
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    export(model, tmp / "tiny", inference_only=True)
    return tmp, cfg


# ---- the wiring of inference, against a sampler written out from DESIGN.md ---------------------------------

def reference_image(model, encoders, source, skeleton, seed, steps, cfg_scale, scale_pow, clip):
    """One pair generated from the definitions alone: its generator (seeded with its own seed) draws the
    source's posterior sample, then the starting noise; DINOv2 sees the skeleton and the source resized to
    224 (bicubic, no antialias); each DDIM step (eta 0, timesteps round(k 999 / (steps - 1))) runs separate
    conditional and unconditional forwards mixed with the power-cosine scale; the model's first channels are
    eps or v as its weights say."""
    g = torch.Generator().manual_seed(seed)
    fs = encoders.first_stage
    mean, logvar = fs.moments(source[None])
    latent = (mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g)) * fs.scale
    x = torch.randn(latent.shape, generator=g)
    resize = lambda image: F.interpolate(image[None], size=(224, 224), mode="bicubic", antialias=False)
    cond = dict(pose=encoders.pose(resize(skeleton)), image=encoders.image(resize(source)), source=latent)
    alphas = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    ts = [round(k * 999 / (steps - 1)) for k in range(steps)]
    for i in reversed(range(steps)):
        t, a = ts[i], float(alphas[ts[i]])
        with torch.no_grad():
            c = model(x, torch.tensor([t]), **cond, drop_cond=torch.tensor([False]))[:, :x.shape[1]]
            u = model(x, torch.tensor([t]), **cond, drop_cond=torch.tensor([True]))[:, :x.shape[1]]
        out = u + (1 + (cfg_scale - 1) * (1 - math.cos(math.pi * (1 - t / 1000) ** scale_pow)) / 2) * (c - u)
        eps = out if model.config.prediction == "eps" else math.sqrt(a) * out + math.sqrt(1 - a) * x
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
        a_prev = float(alphas[ts[i - 1]]) if i > 0 else 1.0
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return fs.decode(x)[0].clamp(-1, 1)


@pytest.fixture(scope="module", params=["v", "eps"])
def wired(request, setup):
    """(cfg path, checkpoint path, model, encoders, cfg) of a random tiny model predicting v or eps."""
    tmp, _ = setup
    cfg = load_config(ROOT / "configs/demo.yaml", TINY + [f"data.root={tmp / 'data'}",
                                                          f"model.prediction={request.param}"])
    (tmp / f"cfg_{request.param}.yaml").write_text(yaml.safe_dump(cfg))
    encoders = build_encoders(cfg["encoders"])
    torch.manual_seed(1)
    model = XMDPT(model_config(cfg)).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.1)  # strong enough that the conditions and the settings visibly matter
    export(model, tmp / f"tiny_{request.param}", inference_only=True)
    return tmp / f"cfg_{request.param}.yaml", tmp / f"tiny_{request.param}", model, encoders, cfg


SETTINGS = dict(steps=4, cfg_scale=3.0, scale_pow=0.5)  # not the defaults, and not symmetric in s and p


def test_pipeline_follows_the_definitions_pair_by_pair(wired):
    """Three pairs in one batch: each is conditioned on its own source (latent and DINOv2 tokens) and target
    skeleton, starts from its own noise, and is sampled with the prediction type its weights store and the
    guidance scale and power asked for."""
    _, ckpt, model, encoders, cfg = wired
    pairs = PairDataset(cfg["data"]["root"], SIZE, "test")
    items = [pairs[i] for i in range(3)]
    sources = torch.stack([it["source"] for it in items])
    skeletons = torch.stack([it["target_skeleton"] for it in items])
    seeds = [11, 12, 13]
    pipe = Pipeline.from_config(cfg, ckpt)
    images = pipe(sources, skeletons=skeletons, seeds=seeds, **SETTINGS)
    keypoints = [pairs.load_keypoints(pairs.pairs[i][0]) for i in range(3)]
    torch.testing.assert_close(pipe(sources, keypoints=keypoints, seeds=seeds, **SETTINGS), images, rtol=0, atol=0)
    clip = cfg["sample"]["clip_denoised"]
    for i in range(3):
        expected = reference_image(model, encoders, sources[i], skeletons[i], seeds[i], clip=clip, **SETTINGS)
        torch.testing.assert_close(images[i], expected, rtol=0, atol=2e-4)
    # The reference does tell these wirings apart: each moves the image 100x beyond the tolerance.
    wrong = {"another pair's source": reference_image(model, encoders, sources[1], skeletons[0], seeds[0],
                                                     clip=clip, **SETTINGS),
             "another pair's skeleton": reference_image(model, encoders, sources[0], skeletons[1], seeds[0],
                                                       clip=clip, **SETTINGS),
             "another pair's noise": reference_image(model, encoders, sources[0], skeletons[0], seeds[1],
                                                    clip=clip, **SETTINGS),
             "swapped guidance": reference_image(model, encoders, sources[0], skeletons[0], seeds[0], clip=clip,
                                                 steps=4, cfg_scale=0.5, scale_pow=3.0)}
    for what, image in wrong.items():
        assert (image - images[0]).abs().max() > 0.02, what


def test_cli_pairs_use_their_index_seed(wired, tmp_path):
    """infer_xmdpt.py writes pair i generated from seed * 1_000_003 + i, whatever the batch."""
    cfg_path, ckpt, model, encoders, cfg = wired
    infer_xmdpt.main(["--config", str(cfg_path), "--ckpt", str(ckpt), "--out", str(tmp_path), "--limit", "3",
                      "--batch-size", "2", "--seed", "5", "--steps", "4", "--cfg-scale", "3", "--scale-pow", "0.5",
                      "--no-grids"])
    pairs = PairDataset(cfg["data"]["root"], SIZE, "test")
    for i in range(3):
        item = pairs[i]
        expected = reference_image(model, encoders, item["source"], item["target_skeleton"], 5 * 1_000_003 + i,
                                   clip=cfg["sample"]["clip_denoised"], **SETTINGS)
        written = np.asarray(Image.open(tmp_path / "generated" / f"{item['name']}.png"), dtype=np.int16)
        assert np.abs(written - to_uint8(expected).astype(np.int16)).max() <= 1


def run(setup, out, *extra):
    tmp, _ = setup
    infer_xmdpt.main(["--config", str(tmp / "cfg.yaml"), "--ckpt", str(tmp / "tiny"),
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
                                                   ("model.prediction=eps", "prediction: v in the checkpoint, eps"),
                                                   ("encoders.image.dinov2=vitb14",
                                                    "image_dim: 384 in the checkpoint, 768")])
def test_checkpoint_of_another_architecture_is_refused_before_any_encoder(setup, tmp_path, monkeypatch,
                                                                          override, difference):
    """Every field that differs is named, and no encoder is built first (DINOv2-G alone is 1B parameters)."""
    tmp, cfg = setup
    assert cfg["model"]["prediction"] == "v"
    cfg = load_config(ROOT / "configs/demo.yaml", TINY + [override, f"data.root={tmp / 'data'}"])
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(cfg))

    def no_encoders(*args, **kwargs):
        raise AssertionError("built the encoders before checking the checkpoint")

    monkeypatch.setattr("inference.pipeline.build_encoders", no_encoders)
    with pytest.raises(ValueError, match=rf"--ckpt .*tiny does not fit the config:\n  {difference} in the config"):
        infer_xmdpt.main(["--config", str(tmp_path / "other.yaml"), "--ckpt", str(tmp / "tiny"),
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
    optional("MediaPipe Pose", _pose_solution)
    from skimage.data import astronaut
    Image.fromarray(astronaut()).save(tmp_path / "astronaut.png")
    Image.fromarray(astronaut()[:, ::-1].copy()).save(tmp_path / "mirrored.png")
    run(setup, tmp_path / "out", "--source", str(tmp_path / "astronaut.png"),
        "--target-pose-from", str(tmp_path / "mirrored.png"))
    assert (tmp_path / "out" / "generated" / "astronaut_2_mirrored.png").is_file()


def figure_colour(rgb):
    """Mean colour of the figure: the pixels unlike the median colour of the image border."""
    rgb = rgb.astype(np.float64) / 255
    background = np.median(np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]]), axis=0)
    figure = np.abs(rgb - background).max(axis=2) > 0.15
    return rgb[figure].mean(axis=0) if figure.sum() > 10 else background


def identity_hits(out, names):
    """The share of pairs whose generated figure is nearest in colour to a target of its own person: what the
    source passes on, whatever the pose (identities are the id_... folders of the synthetic set)."""
    person = lambda name: re.search(r"_2_\w*?id(\d{8})", name).group(1)
    read = lambda kind: np.array([figure_colour(np.asarray(Image.open(out / kind / n))) for n in names])
    generated, targets = read("generated"), read("target")
    nearest = ((generated[:, None] - targets[None]) ** 2).sum(-1).argmin(axis=1)
    return np.mean([person(names[i]) == person(names[j]) for i, j in enumerate(nearest)])


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    """The README's main command: the bundled checkpoint on the 100 synthetic test pairs. It claims generated
    SSIM 0.5630 and PSNR 16.50 dB against the targets (sources: 0.2811 and 12.36 dB); with a margin for
    noise, at least 0.50 and 15 dB. And each figure wears its own person's colours: nearest to a target of
    its own person in 48% of pairs (5 images of each of 20 persons: chance is 5%). Measured with the wiring
    broken: a v-model sampled as eps, or guidance scale and power swapped, fail the SSIM/PSNR bar; each pair
    given another person's source (the batch reversed) gives 0.503 / 14.74 dB and 17%, the batch's first
    source for every pair 0.522 / 15.18 dB and 16%."""
    infer_xmdpt.main(["--out", str(tmp_path)])
    printed = capsys.readouterr().out
    scores = re.search(r"generated ([0-9.]+) / ([0-9.]+) dB, sources ([0-9.]+) / ([0-9.]+) dB", printed)
    ssim, psnr, source_ssim, source_psnr = map(float, scores.groups())
    assert ssim >= 0.50 and psnr >= 15.0, (ssim, psnr)
    assert source_ssim < 0.30 and source_psnr < 12.5
    names = sorted(p.name for p in (tmp_path / "generated").iterdir())
    assert len(names) == 100
    for folder in ("target", "source", "grids"):
        assert sorted(p.name for p in (tmp_path / folder).iterdir()) == names
    assert identity_hits(tmp_path, names) >= 0.35


@pytest.mark.cuda
def test_sampling_loop_never_waits_for_the_device(setup):
    """After a warm-up, the DDIM loop makes no synchronising CUDA call (torch's sync debug mode turns one into
    an error)."""
    tmp, cfg = setup
    pipe = Pipeline.from_config(cfg, tmp / "tiny", device="cuda")
    pairs = PairDataset(cfg["data"]["root"], SIZE, "test")
    inputs = pipe.encode(pairs[0]["source"][None], pairs[0]["target_skeleton"][None], seeds=[0])
    pipe.denoise(inputs, steps=3)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        latents = pipe.denoise(inputs, steps=3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(latents).all()
