"""The evaluation metrics (shared/EVAL.md): Frechet distance, SSIM, PSNR, LPIPS, file naming, and the CLI.

Networks here are randomly initialised (`random_weights=True`, `random_trunk=True`): these tests check the
pipeline, never the published numbers.
"""
import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import cv2
import lmdb
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from scipy import ndimage

from data.deepfashion import flat_name, image_key
from eval.fid_ssim_lpips import legacy_target, main, pair_files
from eval.metrics import (ALEXNET_FILE, INCEPTION_FILE, build_inception, build_lpips,
                          feature_statistics, frechet_distance, lpips_distance, lpips_input, psnr, ssim)

ROOT = Path(__file__).resolve().parents[1]
LEGACY = "fashionWOMENBlouses_Shirtsid0000063703_1front_2_fashionWOMENBlouses_Shirtsid0000063701_1front_vis.png"


def random_image(rng, size=256):
    """A smooth random size x size RGB image (uint8), like a photo rather than noise."""
    small = rng.integers(0, 256, (8, 8, 3)).astype(np.float32)
    return np.clip(cv2.resize(small, (size, size)) + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)


def write_images(folder, names, rng):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        cv2.imwrite(str(folder / name), random_image(rng)[..., ::-1])
    return folder


def with_moments(mu, cov, n, rng):
    """n samples whose sample mean and (unbiased) covariance are exactly mu and cov."""
    x = rng.normal(size=(n, len(mu)))
    x -= x.mean(axis=0)
    x = x @ np.linalg.inv(np.linalg.cholesky(np.cov(x, rowvar=False))).T
    return x @ np.linalg.cholesky(cov).T + mu


# ----------------------------------------------------------------------------- Frechet distance

def test_frechet_of_a_set_with_itself_is_zero():
    mu, sigma = feature_statistics(np.random.default_rng(0).normal(size=(500, 32)))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


@pytest.mark.parametrize("rotate", [False, True])
def test_frechet_matches_closed_form(rotate):
    rng = np.random.default_rng(1)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    var1, var2 = rng.uniform(0.5, 3, d), rng.uniform(0.5, 3, d)
    q = np.linalg.qr(rng.normal(size=(d, d)))[0] if rotate else np.eye(d)  # the same rotation keeps the distance
    cov1, cov2 = q @ np.diag(var1) @ q.T, q @ np.diag(var2) @ q.T
    stats1 = feature_statistics(with_moments(mu1, cov1, 200, rng))
    stats2 = feature_statistics(with_moments(mu2, cov2, 300, rng))
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert frechet_distance(*stats1, *stats2) == pytest.approx(expected, rel=1e-9)


# ----------------------------------------------------------------------------- SSIM, PSNR, LPIPS

def test_ssim_identical_is_one():
    image = random_image(np.random.default_rng(2))
    assert ssim(image, image) == pytest.approx(1.0, abs=1e-12)


def test_ssim_is_the_gaussian_sigma_1_2_population_formula():
    rng = np.random.default_rng(3)
    gt, gen = random_image(rng, 64), random_image(rng, 64)
    x, y = gt.astype(np.float64), gen.astype(np.float64)
    c1, c2 = (0.01 * (y.max() - y.min())) ** 2, (0.03 * (y.max() - y.min())) ** 2  # range of the generated image
    blur = partial(ndimage.gaussian_filter, sigma=1.2, truncate=3.5, mode="reflect")
    maps = []
    for ch in range(3):
        ux, uy = blur(x[..., ch]), blur(y[..., ch])
        vx, vy = blur(x[..., ch] ** 2) - ux ** 2, blur(y[..., ch] ** 2) - uy ** 2
        vxy = blur(x[..., ch] * y[..., ch]) - ux * uy
        s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
        maps.append(s[4:-4, 4:-4].mean())  # 9x9 window: 4 border pixels left out
    assert ssim(gt, gen) == pytest.approx(np.mean(maps), rel=1e-10)


def test_ssim_rejects_different_sizes():
    with pytest.raises(ValueError, match="same size"):
        ssim(np.zeros((256, 256, 3), np.uint8), np.zeros((256, 176, 3), np.uint8))


def test_psnr_identical_is_inf_and_offset_is_exact():
    gt = np.random.default_rng(4).integers(0, 200, (256, 256, 3)).astype(np.uint8)
    assert psnr(gt, gt) == float("inf")
    # a constant offset of 5 levels: mse = (5/255)^2 on [0, 1], PSNR = 10 log10(1 / mse)
    assert psnr(gt, gt + 5) == pytest.approx(10 * np.log10(1 / (5 / 255) ** 2), abs=1e-10)


def test_lpips_random_trunk_zero_for_identical_positive_otherwise():
    torch.manual_seed(0)
    model = build_lpips(random_trunk=True)  # random AlexNet trunk: a pipeline check, not real LPIPS values
    rng = np.random.default_rng(5)
    a, b = (torch.stack([lpips_input(random_image(rng))]) for _ in range(2))
    assert a.shape == (1, 3, 256, 176) and -1 <= a.min() and a.max() <= 1
    assert lpips_distance(model, a, a).abs().max().item() < 1e-7
    assert lpips_distance(model, a, b).item() > 0
    with pytest.raises(ValueError):
        build_lpips()


def test_lpips_trunk_loads_from_a_torchvision_alexnet_file(tmp_path):
    features = torchvision.models.alexnet(weights=None).features
    path = tmp_path / ALEXNET_FILE
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    model = build_lpips(path)
    assert torch.equal(model.net.slice1[0].weight, features[0].weight)
    assert torch.equal(getattr(model.net.slice5, "10").bias, features[10].bias)


def test_inception_loads_a_torchvision_state_dict(tmp_path):
    saved = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict()
    torch.save(saved, tmp_path / INCEPTION_FILE)
    loaded = build_inception(tmp_path / INCEPTION_FILE).state_dict()
    assert set(saved) - set(loaded) == {"fc.weight", "fc.bias"}  # the classifier becomes the identity
    assert all(torch.equal(loaded[k], saved[k]) for k in loaded)
    with pytest.raises(ValueError):
        build_inception()


# ----------------------------------------------------------------------------- naming

def test_legacy_name_to_ground_truth_name():
    assert legacy_target(LEGACY) == "fashionWOMENBlouses_Shirtsid0000063701_1front"
    assert legacy_target("fashionWOMENBlouses_Shirtsid0000063701_1front.png") is None


def test_pairs_legacy_names(tmp_path):
    rng = np.random.default_rng(6)
    gen = write_images(tmp_path / "gen", [LEGACY], rng)
    gt = write_images(tmp_path / "gt", ["fashionWOMENBlouses_Shirtsid0000063701_1front.png"], rng)
    assert pair_files(gen, gt) == [(gt / "fashionWOMENBlouses_Shirtsid0000063701_1front.png", gen / LEGACY)]


def test_pairs_identical_names(tmp_path):
    rng = np.random.default_rng(7)
    gen = write_images(tmp_path / "gen", ["a.png", "b.png"], rng)
    gt = write_images(tmp_path / "gt", ["a.png", "b.png", "c.png"], rng)
    assert pair_files(gen, gt) == [(gt / "a.png", gen / "a.png"), (gt / "b.png", gen / "b.png")]


@pytest.mark.parametrize("generated, missing", [
    (["a.png", "b.png"], "b.png"),
    ([LEGACY], "fashionWOMENBlouses_Shirtsid0000063701_1front.png"),
])
def test_missing_ground_truth_is_an_error_naming_it(tmp_path, generated, missing):
    rng = np.random.default_rng(8)
    gen = write_images(tmp_path / "gen", generated, rng)
    gt = write_images(tmp_path / "gt", ["a.png"], rng)
    with pytest.raises(FileNotFoundError, match=missing):
        pair_files(gen, gt)


# ----------------------------------------------------------------------------- command line

@pytest.fixture
def folders(tmp_path, monkeypatch):
    """generated/, gt/ (same names) and real/ folders of 256x256 PNGs, and no weights in $TORCH_HOME."""
    rng = np.random.default_rng(9)
    names = ["p0.png", "p1.png", "p2.png"]
    return (write_images(tmp_path / "gen", names, rng), write_images(tmp_path / "gt", names, rng),
            write_images(tmp_path / "real", [f"r{i}.png" for i in range(4)], rng))


def test_cli_without_weights_reports_ssim_psnr_and_names_missing_files(folders, tmp_path, capsys):
    gen, gt, real = folders
    out = tmp_path / "metrics.json"
    main(["--generated", str(gen), "--target", str(gt), "--real-train", str(real), "--json", str(out),
          "--workers", "0", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert INCEPTION_FILE in printed and ALEXNET_FILE in printed and "not computed" in printed
    results = json.loads(out.read_text())
    assert results["pairs"] == 3 and 0 < results["ssim"] < 1 and results["psnr"] > 0
    assert "fid" not in results and "lpips" not in results
    assert INCEPTION_FILE in results["not_computed"]["fid"] and ALEXNET_FILE in results["not_computed"]["lpips"]


def test_cli_target_against_itself(folders):
    _, gt, _ = folders
    torch.manual_seed(0)
    lpips_model = build_lpips(random_trunk=True)  # random trunk: a pipeline check only
    results = main(["--generated", str(gt), "--target", str(gt), "--batch-size", "2", "--workers", "0"],
                   lpips_model=lpips_model)
    assert results["ssim"] == pytest.approx(1.0) and results["psnr"] == float("inf")
    assert results["lpips"] == pytest.approx(0.0, abs=1e-7) and results["lpips_pairs"] == 2  # 3 pairs, batches of 2
    assert "--real-train" in results["not_computed"]["fid"]


def test_script_help_runs_and_names_the_protocol():
    help_text = subprocess.run([sys.executable, "eval/fid_ssim_lpips.py", "--help"], cwd=ROOT, check=True,
                               capture_output=True, text=True).stdout
    assert "PIDM/GFLA protocol" in help_text and "--keep-last-batch" in help_text


class Recording(torch.nn.Module):
    """Wraps a feature network and keeps the batches it sees and what it returns."""

    def __init__(self, net):
        super().__init__()
        self.net, self.inputs, self.outputs = net, [], []

    def forward(self, x):
        self.inputs.append(x)
        self.outputs.append(self.net(x))
        return self.outputs[-1]

    def seen(self):
        return sum(len(x) for x in self.inputs)


def reference_fid_input(paths):
    """EVAL.md's FID preprocessing written out: float 0..255, cv2 to 176x256, /255, bilinear 299, affine."""
    images = [cv2.resize(cv2.imread(str(p))[..., ::-1].astype(np.float32), (176, 256)) / 255 for p in paths]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    return x * torch.tensor([0.458, 0.448, 0.450]).view(3, 1, 1) + torch.tensor([-0.030, -0.088, -0.188]).view(3, 1, 1)


def fid_argv(gen, gt, real, *extra):
    return ["--generated", str(gen), "--target", str(gt), "--real-train", str(real), "--batch-size", "2",
            "--workers", "0", "--device", "cpu", *extra]


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # 2 images give a singular covariance
def test_cli_fid_end_to_end_with_random_inception(folders):
    gen, gt, real = folders
    torch.manual_seed(0)
    inception = build_inception(random_weights=True)  # random weights: checks the pipeline, not real FID values
    inception.fc = torch.nn.Linear(2048, 8)  # a small head: sqrtm of 2048x2048 takes ~30 s on 2 CPU cores
    net = Recording(inception)
    results = main(fid_argv(gen, gt, real), inception=net)  # the real set first, then the generated one
    assert (results["fid_real"], results["fid_generated"]) == (4, 2)  # 3 generated, batches of 2: legacy drop
    expected_input = reference_fid_input([*sorted(real.iterdir()), *sorted(gen.iterdir())[:2]])
    assert torch.allclose(torch.cat(net.inputs), expected_input, atol=1e-5)
    real_features, gen_features = (torch.cat(out).double().numpy() for out in (net.outputs[:2], net.outputs[2:]))
    expected = frechet_distance(*feature_statistics(gen_features), *feature_statistics(real_features))
    assert results["fid"] == pytest.approx(expected, rel=1e-9) and results["fid"] > 0


def test_cli_stats_cache_reused_and_invalidated(folders, tmp_path):
    gen, gt, real = folders
    torch.manual_seed(0)
    tiny = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 8))
    cache = tmp_path / "cache"
    argv = fid_argv(gen, gt, real, "--stats-cache", str(cache), "--keep-last-batch")

    def run():
        net = Recording(tiny)
        return main(argv, inception=net)["fid"], net.seen()

    fid, seen = run()
    assert seen == 4 + 3 and len(list(cache.iterdir())) == 1
    assert run() == (fid, 3)  # the real statistics come from the cache

    changed = real / "r3.png"
    cv2.imwrite(str(changed), random_image(np.random.default_rng(10)))
    os.utime(changed, ns=(1, 1))
    changed_fid, seen = run()
    assert seen == 7 and changed_fid != fid  # the folder changed: recomputed

    for stale in cache.iterdir():
        np.savez(stale, key="another key", mu=np.zeros(8), sigma=np.eye(8))
    assert run() == (pytest.approx(changed_fid), 7)  # a file written for another key is not trusted


@pytest.mark.parametrize("listed", ["path", "flat"])
def test_real_set_from_lmdb_matches_the_folder(folders, tmp_path, listed):
    gen, gt, real = folders
    root = tmp_path / "deepfashion"
    paths = [f"img/WOMEN/Dresses/id_0000000{i}/01_1_front.jpg" for i in range(4)]
    (root / "256-256").mkdir(parents=True)
    with lmdb.open(str(root / "256-256"), map_size=1 << 26) as env, env.begin(write=True) as txn:
        for path, image in zip(paths, sorted(real.iterdir())):
            txn.put(image_key(path).encode(), image.read_bytes())
    names = paths if listed == "path" else [flat_name(path) + ".jpg" for path in paths]
    (root / "train.lst").write_text("\n".join(names) + "\n")
    torch.manual_seed(0)
    tiny = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 8))
    fids = [main(fid_argv(gen, gt, source), inception=tiny)["fid"] for source in (real, root, root / "256-256")]
    assert fids[0] == pytest.approx(fids[1], rel=1e-12) and fids[1] == fids[2]

    (root / "train.lst").write_text("\n".join(names + ["fashionWOMENDressesid0000000901_1front.jpg"]) + "\n")
    with pytest.raises(KeyError, match="1 of the 5 images .* fashionWOMENDressesid0000000901_1front.png"):
        main(fid_argv(gen, gt, root), inception=tiny)
