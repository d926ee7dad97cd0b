"""The evaluation metrics (docs/evaluation.md): Frechet distance, SSIM, PSNR, LPIPS, file naming, and the CLI.

Networks here are randomly initialised (`random_weights=True`, `random_trunk=True`): these tests check the
pipeline, never the published numbers.
"""
import json
import os
import shutil
import subprocess
import sys
import warnings
from functools import partial
from pathlib import Path

import cv2
import lmdb
import lpips
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torchvision import transforms

from eval.fid_ssim_lpips import main
from eval.images import flat_name, image_key, legacy_target, pair_files, read_rgb
from eval.metrics import (ALEXNET_FILE, INCEPTION_FILE, build_inception, build_lpips, feature_statistics,
                          frechet_distance, lpips_distance, lpips_input, paired_scores, psnr, ssim)

ROOT = Path(__file__).resolve().parents[1]
LEGACY = "fashionWOMENBlouses_Shirtsid0000063703_1front_2_fashionWOMENBlouses_Shirtsid0000063701_1front_vis.png"


def random_image(rng, size=256):
    """A smooth random size x size RGB image (uint8), like a photo rather than noise."""
    small = rng.integers(0, 256, (8, 8, 3)).astype(np.float32)
    return np.clip(cv2.resize(small, (size, size)) + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)


def write_images(folder, names, rng, size=256):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        cv2.imwrite(str(folder / name), random_image(rng, size)[..., ::-1])
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


def no_download(url, *args, **kwargs):
    raise AssertionError(f"tried to download {url}")


def test_lpips_equals_the_lpips_package_given_the_same_trunk(tmp_path, monkeypatch):
    """Our LPIPS (trunk file, cv2 resize, [-1, 1]) per pair and through the CLI, against lpips.LPIPS loading the
    same AlexNet file by itself (torchvision's loader, from $TORCH_HOME) and fed by the package's own helpers."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    trunk = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE
    assert trunk.parent == tmp_path / "torch" / "hub" / "checkpoints"
    trunk.parent.mkdir(parents=True)
    torch.manual_seed(0)
    saved = torchvision.models.alexnet(weights=None).state_dict()  # random: stands in for the ImageNet file
    torch.save(saved, trunk)
    with warnings.catch_warnings():  # lpips asks torchvision for the deprecated `pretrained=True`
        warnings.simplefilter("ignore", UserWarning)
        reference = lpips.LPIPS(net="alex", version="0.1", verbose=False).eval()
    assert torch.equal(getattr(reference.net.slice5, "10").weight, saved["features.10.weight"])

    rng = np.random.default_rng(11)
    names = ["p0.png", "p1.png", "p2.png"]
    gen, gt = write_images(tmp_path / "gen", names, rng), write_images(tmp_path / "gt", names, rng)

    def package_input(path):  # docs/evaluation.md's cv2 resize to 176x256, then the package's reader and [-1, 1] helper
        return lpips.im2tensor(cv2.resize(lpips.load_image(str(path)).astype(np.float32), (176, 256)))

    with torch.no_grad():
        expected = torch.cat([reference(package_input(gt / n), package_input(gen / n)) for n in names]).flatten()
    gt_batch, gen_batch = (torch.stack([lpips_input(read_rgb(d / n)) for n in names]) for d in (gt, gen))
    ours = lpips_distance(build_lpips(trunk), gt_batch, gen_batch)
    cli = main(["--generated", str(gen), "--target", str(gt), "--lpips-weights", str(trunk), "--workers", "0",
                "--device", "cpu"])
    assert expected.min() > 1e-3 and expected.std() > 1e-4  # three different, non-trivial distances
    assert (ours - expected).abs().max().item() < 1e-6
    assert cli["lpips_pairs"] == 3 and cli["lpips"] == pytest.approx(expected.mean().item(), abs=1e-6)


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


def user_env(tmp_path):
    """The environment of a user's shell: no PYTHONPATH, and a $TORCH_HOME with no weights in it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return dict(env, TORCH_HOME=str(tmp_path / "torch_home"))


def test_script_help_runs_as_a_user_types_it(tmp_path):
    """The README's way, as a module, and by its path from another folder (the three side by side)."""
    commands = [(["eval/fid_ssim_lpips.py"], ROOT), (["-m", "eval.fid_ssim_lpips"], ROOT),
                ([str(ROOT / "eval" / "fid_ssim_lpips.py")], tmp_path)]
    runs = [subprocess.Popen([sys.executable, *command, "--help"], cwd=cwd, env=user_env(tmp_path), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for command, cwd in commands]
    for (command, _), run in zip(commands, runs):
        help_text, err = run.communicate(timeout=120)
        assert run.returncode == 0, (command, err[-2000:])
        assert "PIDM/GFLA protocol" in help_text and "--keep-last-batch" in help_text, command


def test_eval_folder_copied_alone_computes_the_same_scores(folders, tmp_path):
    """eval/ needs nothing else of this repository: copied on its own next to some outputs and run by its path,
    it reports the scores the package computes."""
    gen, gt, _ = folders
    work = tmp_path / "elsewhere"
    shutil.copytree(ROOT / "eval", work / "eval", ignore=shutil.ignore_patterns("__pycache__"))
    out = work / "metrics.json"
    subprocess.run([sys.executable, "eval/fid_ssim_lpips.py", "--generated", str(gen), "--target", str(gt),
                    "--json", str(out), "--workers", "0", "--device", "cpu"], cwd=work, env=user_env(tmp_path),
                   check=True, capture_output=True, text=True)
    copied = json.loads(out.read_text())
    here = main(["--generated", str(gen), "--target", str(gt), "--workers", "0", "--device", "cpu"])
    assert copied["pairs"] == 3 and 0 < copied["ssim"] < 1
    assert (copied["ssim"], copied["psnr"]) == (here["ssim"], here["psnr"])
    assert set(copied["not_computed"]) == {"fid", "lpips"}


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
    """docs/evaluation.md's FID preprocessing written out: float 0..255, cv2 to 176x256, /255, bilinear 299, affine."""
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


def cfld_reference(gt_paths, gen_paths, real_paths, lpips_model):
    """CFLD's evaluation written out: per-pair scores, LPIPS, and the FID network inputs (real set first).

    Every image goes through torchvision's PIL bicubic Resize to 256x176 and ToTensor, as CFLD's datasets do for
    the ground truth and the real set; the generated images get the same PIL resize (docs/evaluation.md), then CFLD's
    uint8 round trip. The scores use CFLD's (C, H, W) float32 arrays.
    """
    load = transforms.Compose([transforms.Resize([256, 176], transforms.InterpolationMode.BICUBIC, antialias=True),
                               transforms.ToTensor()])
    gts, reals = (torch.stack([load(Image.open(p).convert("RGB")) for p in paths]) for paths in (gt_paths, real_paths))
    preds = torch.stack([load(Image.open(p).convert("RGB")) for p in gen_paths])
    preds = (preds * 255).clamp(0, 255).to(torch.uint8).float() / 255
    scores = []
    for g, p in zip(gts.numpy(), preds.numpy()):
        g256, p256 = g * 255.0, p * 255.0
        scores.append({
            "ssim": structural_similarity(g, p, data_range=1, win_size=51, channel_axis=0),
            "ssim_256": structural_similarity(g256, p256, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                              channel_axis=0, data_range=p256.max() - p256.min()),
            "psnr": peak_signal_noise_ratio(g, p, data_range=1)})
    with torch.no_grad():
        distances = lpips_model(preds, gts, normalize=True).flatten()

    def inception_input(x):  # CFLD writes the affine as ImageNet's std / 0.5 and (mean - 0.5) / 0.5
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        std, mean = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1), torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
        return x * (std / 0.5) + (mean - 0.5) / 0.5

    return scores, distances, torch.cat([inception_input(reals), inception_input(preds)])


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # 3 images give a singular covariance
def test_cfld_protocol_is_cfld_computation_written_out(tmp_path, capsys):
    rng = np.random.default_rng(12)
    names = ["p0.png", "p1.png", "p2.png"]
    gen = write_images(tmp_path / "gen", names, rng)  # 256x256, as our models write them
    gt = write_images(tmp_path / "gt", names, rng, size=352)  # another size: resized too
    real = write_images(tmp_path / "real", [f"r{i}.png" for i in range(5)], rng, size=300)
    torch.manual_seed(0)
    lpips_model = build_lpips(random_trunk=True)  # random trunk: a pipeline check only
    tiny = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 8))
    net = Recording(tiny)
    out = tmp_path / "metrics.json"
    results = main(fid_argv(gen, gt, real, "--protocol", "cfld", "--json", str(out)), inception=net,
                   lpips_model=lpips_model)
    scores, distances, fid_inputs = cfld_reference([gt / n for n in names], [gen / n for n in names],
                                                   sorted(real.iterdir()), lpips_model)

    for n, expected in zip(names, scores):
        assert paired_scores(read_rgb(gt / n), read_rgb(gen / n), 256, "cfld") == pytest.approx(expected, abs=1e-6)
    ours = lpips_distance(lpips_model, *(torch.stack([lpips_input(read_rgb(d / n), 256, "cfld") for n in names])
                                         for d in (gt, gen)))
    assert (ours - distances).abs().max().item() < 1e-6
    for key in ("ssim", "ssim_256", "psnr"):
        assert results[key] == pytest.approx(np.mean([s[key] for s in scores]), abs=1e-6)
    assert results["lpips"] == pytest.approx(distances.mean().item(), abs=1e-6)
    # every image for FID and LPIPS, though batches of 2 would drop one of each set under pidm
    assert (results["fid_real"], results["fid_generated"], results["lpips_pairs"]) == (5, 3, 3)
    assert torch.allclose(torch.cat(net.inputs), fid_inputs, atol=1e-6)
    real_features, gen_features = (torch.cat(o).double().numpy() for o in (net.outputs[:3], net.outputs[3:]))
    assert results["fid"] == pytest.approx(frechet_distance(*feature_statistics(gen_features),
                                                            *feature_statistics(real_features)), rel=1e-9)

    saved = json.loads(out.read_text())  # the output names the protocol and what each SSIM is
    assert saved["protocol"] == "cfld" and set(saved["ssim_definitions"]) == {"ssim", "ssim_256"}
    assert "51x51" in saved["ssim_definitions"]["ssim"] and "sigma 1.5" in saved["ssim_definitions"]["ssim_256"]
    printed = capsys.readouterr().out
    assert "CFLD protocol" in printed and "SSIM_256" in printed and "51x51" in printed


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # few images give a singular covariance
def test_stats_cache_is_keyed_by_protocol(folders, tmp_path):
    gen, gt, real = folders
    torch.manual_seed(0)
    tiny = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 8))
    cache, seen = tmp_path / "cache", []
    for protocol in ("pidm", "cfld", "pidm", "cfld"):  # 4 real images in batches of 2: the same count in both
        net = Recording(tiny)
        main(fid_argv(gen, gt, real, "--stats-cache", str(cache), "--protocol", protocol), inception=net)
        seen.append(net.seen())
    assert seen == [4 + 2, 4 + 3, 2, 3] and len(list(cache.iterdir())) == 2


# ---- distribution metrics: SWD on Laplacian-pyramid patches, KID ------------------------------------------------

def image_tiles(count, size=32, seed=0):
    """`count` random size x size tiles of scikit-image's photographs, uint8 RGB: a set of natural images."""
    from skimage import data
    photos = [data.astronaut(), data.chelsea(), data.coffee()]
    rng = np.random.default_rng(seed)
    tiles = []
    for _ in range(count):
        photo = photos[rng.integers(len(photos))]
        y, x = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
        tiles.append(photo[y:y + size, x:x + size])
    return np.stack(tiles)


def test_the_laplacian_pyramid_adds_back_up_to_the_image():
    """Bands down to 16x16 and the residual; expanding each coarser sum and adding the band gives the image."""
    from eval.metrics import laplacian_pyramid, pyramid_up
    images = image_tiles(4, 64).astype(np.float64) / 255
    levels = laplacian_pyramid(images, min_size=16)
    assert [level.shape[1] for level in levels] == [64, 32, 16]  # two bands, then the 16x16 residual
    image = levels[-1]
    for band in reversed(levels[:-1]):
        image = band + pyramid_up(image)
    np.testing.assert_allclose(image, images, atol=1e-12)
    flat = np.full((1, 32, 32, 1), 0.7)
    np.testing.assert_allclose(laplacian_pyramid(flat)[0], 0, atol=1e-12)  # a flat image has no band-pass
    # One level down, written out: the 5x5 binomial filter [1 4 6 4 1]^2 / 256 with the edges mirrored about the
    # border pixels, then every other row and column.
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
    taps = np.array([1, 4, 6, 4, 1]) / 16
    blurred = sum(taps[i] * taps[j] * padded[:, i:i + 64, j:j + 64] for i in range(5) for j in range(5))
    np.testing.assert_allclose(levels[1] + pyramid_up(levels[2]), blurred[:, ::2, ::2], atol=1e-12)


def test_sliced_wasserstein_is_the_mean_one_dimensional_distance_along_random_directions():
    """The same unit directions (drawn from the seed as the function draws them), each set projected on them and
    scipy's 1-D Wasserstein distance: their mean is the function's."""
    from scipy.stats import wasserstein_distance

    from eval.metrics import sliced_wasserstein
    g = np.random.default_rng(3)
    a, b = g.standard_normal((200, 6)), g.standard_normal((200, 6)) * 1.5 + 0.3
    directions = np.random.default_rng(11).standard_normal((6, 64))
    directions /= np.linalg.norm(directions, axis=0)
    written = np.mean([wasserstein_distance(a @ d, b @ d) for d in directions.T])
    assert sliced_wasserstein(a, b, 64, np.random.default_rng(11)) == pytest.approx(written, rel=1e-9)
    assert sliced_wasserstein(a, a, 64) == 0


def test_swd_punishes_blur_and_grain_alike():
    """Two sets of photograph tiles from the same photographs are close; the second set blurred, or with grain
    added, is far farther from the first, at the finest level (2.7x and 11x here) and on average. (Fewer patches
    and directions than the definition's 128 and 512, for speed: the same behaviour.)"""
    from scipy.ndimage import gaussian_filter

    from eval.metrics import swd
    distance = lambda a, b: swd(a, b, per_image=64, projections=128)
    real, other = image_tiles(400, seed=1), image_tiles(400, seed=2)
    blurred = np.stack([gaussian_filter(t.astype(np.float64), sigma=(1, 1, 0)) for t in other])
    blurred = blurred.round().astype(np.uint8)
    grain = np.random.default_rng(0).normal(0, 12, other.shape)
    grainy = np.clip(other + grain, 0, 255).round().astype(np.uint8)
    base, blur, noise = (distance(real, images) for images in (other, blurred, grainy))
    assert set(base) == {32, 16, "mean"}
    for score in (blur, noise):
        assert score[32] > 2 * base[32] and score["mean"] > 1.5 * base["mean"], (base, score)
    same = distance(real, real)["mean"]
    assert same < base["mean"] / 3  # patches drawn apart for each set: near, not at, 0
    # Each channel's patches are normalised: the same photographs at half the contrast are as near as themselves.
    dim = (real.astype(np.float64) * 0.5 + 64).round().astype(np.uint8)
    assert distance(real, dim)["mean"] < 1.2 * same


def test_kid_is_the_unbiased_mmd_with_the_cubic_kernel():
    """One subset of all the features: KID is the unbiased MMD^2 with k(x, y) = (x.y / D + 1)^3, written out."""
    from eval.metrics import kid
    g = np.random.default_rng(5)
    x, y = g.standard_normal((40, 8)), g.standard_normal((40, 8)) + 0.5
    k = lambda a, b: (a @ b.T / 8 + 1) ** 3
    m = len(x)
    off_diagonal = lambda kk: (kk.sum() - np.trace(kk)) / (m * (m - 1))
    written = off_diagonal(k(x, x)) + off_diagonal(k(y, y)) - 2 * k(x, y).mean()
    mean, _ = kid(x, y, subset_size=40, subsets=1)
    assert mean == pytest.approx(written, rel=1e-9)
    assert kid(x, y, subset_size=20, subsets=10)[0] > 0.1 > abs(kid(x, g.standard_normal((40, 8)), 40, 1)[0])
