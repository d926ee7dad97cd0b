"""scripts/compare_samplers.py: every row of its table scores the images that the Pipeline draws for each pair
alone, from that pair's own noise (item_seed(seed, i)), whatever the batch, and gives each figure's mean over the
seeds with their spread; the evaluations per image are two per guided step and one per consistency step."""
import cv2
import numpy as np
import pytest
import torch
import torchvision

from configs import load_config
from data.deepfashion import PairDataset
from data.images import to_uint8
from data.sampler import item_seed
from data.synthetic import make_synthetic
from eval.metrics import INCEPTION_FILE, InceptionFeatures, build_inception, fid_input, kid, psnr, ssim, swd
from inference.pipeline import DEMO_CHECKPOINT, DEMO_CONFIG, FAST_DEMO_CHECKPOINT, FAST_DEMO_CONFIG, Pipeline
from scripts import compare_samplers

SIZE = load_config(DEMO_CONFIG)["data"]["size"]
SEEDS = (7, 8)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("samplers")
    torch.manual_seed(0)  # random Inception weights, saved as torchvision's file: KID's path, not its values
    torch.save(torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=True).state_dict(),
               tmp / INCEPTION_FILE)
    make_synthetic(tmp / "data", num_identities=4, poses_per_identity=4, size=SIZE, seed=2)  # 4 test pairs
    compare_samplers.main(["--data", str(tmp / "data"), "--limit", "3", "--batch-size", "2", "--seeds",
                           *map(str, SEEDS), "--ddim", "3", "--dpm", "2", "--student", "1", "2", "--curve",
                           f"again={FAST_DEMO_CHECKPOINT}", "--curve-steps", "2", "--grid", "teacher dpm++ 2",
                           "again lcm 2", "--grid-pairs", "2", "--out", str(tmp / "out"), "--device", "cpu",
                           "--inception", str(tmp / INCEPTION_FILE)])
    lines = (tmp / "out" / "samplers.md").read_text().splitlines()
    rows = {(r[0], r[1], int(r[2])): r for r in ([c.strip() for c in line.strip("|").split("|")] for line in lines[4:])}
    return tmp, rows


def alone(pipeline, pair, seed, **settings):
    """A pair's image drawn by itself, with its own seed."""
    image = pipeline(pair["source"][None], skeletons=pair["target_skeleton"][None], seeds=[seed],
                     settings=pipeline.settings(**settings))[0]
    return to_uint8(image)


def mean_and_spread(text):
    """(mean, standard deviation) of a 'mean ± sd' cell."""
    mean, spread = text.split(" ± ")
    return float(mean), float(spread)


def test_each_row_scores_the_pipelines_own_image_of_each_pair_over_the_seeds(table):
    tmp, rows = table
    teacher = Pipeline.from_config(DEMO_CONFIG, DEMO_CHECKPOINT, torch.device("cpu"))
    student = Pipeline.from_config(FAST_DEMO_CONFIG, FAST_DEMO_CHECKPOINT, torch.device("cpu"),
                                   encoders=teacher.encoders)
    pairs = PairDataset(tmp / "data", SIZE, "test")
    pairs = [pairs[i] for i in range(3)]
    targets = [to_uint8(p["target"]) for p in pairs]
    inception = InceptionFeatures(build_inception(tmp / INCEPTION_FILE))
    assert sorted(rows) == [("again", "lcm", 2), ("student", "lcm", 1), ("student", "lcm", 2),
                            ("teacher", "ddim", 3), ("teacher", "dpm++", 2)]
    for (model, sampler, steps), pipeline, evaluations in [(("teacher", "ddim", 3), teacher, 6),
                                                           (("teacher", "dpm++", 2), teacher, 4),
                                                           (("student", "lcm", 1), student, 1),
                                                           (("again", "lcm", 2), student, 2)]:
        figures = {"ssim": [], "psnr": [], "versus": [], "swd": [], "kid": []}
        for seed in SEEDS:
            seeds = [item_seed(seed, i) for i in range(3)]
            reference = [alone(teacher, p, s, sampler="ddim", steps=3) for p, s in zip(pairs, seeds)]
            images = [alone(pipeline, p, s, sampler=sampler, steps=steps) for p, s in zip(pairs, seeds)]
            figures["ssim"].append(np.mean([ssim(t, g) for t, g in zip(targets, images)]))
            figures["psnr"].append(np.mean([psnr(t, g) for t, g in zip(targets, images)]))
            figures["versus"].append(np.mean([psnr(r, g) for r, g in zip(reference, images)]))
            figures["swd"].append(swd(np.stack(targets), np.stack(images))["mean"])
            features = [inception(torch.stack([fid_input(x, SIZE) for x in side])).double().numpy()
                        for side in (targets, images)]
            figures["kid"].append(kid(*features)[0])
        row = rows[(model, sampler, steps)]
        assert int(row[3]) == evaluations
        for column, name, tolerance in ((4, "ssim", 6e-5), (5, "psnr", 6e-3), (8, "swd", 6e-3)):
            mean, spread = mean_and_spread(row[column])
            assert mean == pytest.approx(np.mean(figures[name]), abs=tolerance), name
            assert spread == pytest.approx(np.std(figures[name]), abs=tolerance), name
        mean, spread = mean_and_spread(row[9])  # random weights: features, and KID, of no meaningful scale
        assert mean == pytest.approx(np.mean(figures["kid"]), rel=1e-4)
        assert spread == pytest.approx(np.std(figures["kid"]), rel=1e-3)
        if sampler != "ddim":
            assert mean_and_spread(row[6])[0] == pytest.approx(np.mean(figures["versus"]), abs=6e-3)
    grid = cv2.imread(str(tmp / "out" / "samplers.png"))
    assert grid.shape == (2 * SIZE, 4 * SIZE, 3)  # 2 pairs: source | target | DPM++ 2 | the other student at 2
    plane = cv2.imread(str(tmp / "out" / "plane.png"))
    assert plane is not None and plane.shape[0] > 300
