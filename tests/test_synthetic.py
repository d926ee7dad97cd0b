import re

import cv2
import numpy as np
import pytest

from data.deepfashion import PairDataset, pose_path, read_pairs
from data.lmdb import LMDBReader
from data.pose import load_keypoints, to_image_coords
from data.synthetic import make_synthetic
from eval.images import flat_name, image_key
from scripts import make_synthetic as make_synthetic_script

PATH = re.compile(r"img/SYNTH/Figures/id_\d{8}/\d{2}_[12347]_(front|side|back|full|additional)\.jpg")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """5 figures x 6 poses (a second outfit for the sixth) at 32 and 64."""
    root = tmp_path_factory.mktemp("synth")
    counts = make_synthetic(root, num_identities=5, poses_per_identity=6, size=[32, 64], seed=7, test_fraction=0.4)
    return root, counts


def lmdb_items(path):
    reader = LMDBReader(path)
    return {key: bytes(reader.get(key)) for key in reader.keys()}


def identity(path):
    return path.split("/")[3]


def test_layout(synth):
    root, counts = synth
    assert counts == {"train_images": 18, "train_pairs": 18, "test_images": 12, "test_pairs": 12}
    train, test = read_pairs(root / "train_pairs.txt"), read_pairs(root / "test_pairs.txt")
    for pairs in (train, test):
        for target, sources in pairs:
            assert PATH.fullmatch(target) and target not in sources
            assert all(identity(source) == identity(target) for source in sources)
    assert all(len(sources) == 5 for _, sources in train) and all(len(sources) == 1 for _, sources in test)
    assert not {identity(t) for t, _ in train} & {identity(t) for t, _ in test}
    for split, pairs in (("train", train), ("test", test)):
        names = [flat_name(target) + ".jpg" for target, _ in pairs]
        assert (root / f"{split}.lst").read_text().splitlines() == names
    every = {target for target, _ in train + test}
    assert len(every) == 30 and any("/02_1_front.jpg" in path for path in every)
    for size in (32, 64):
        assert set(lmdb_items(root / f"{size}-{size}")) == {image_key(path) for path in every}
        assert PairDataset(root, size=size, split="test")[0]["target"].shape == (3, size, size)
    assert all(pose_path(root, path).is_file() for path in every)
    assert not list(root.glob("*.partial"))


def test_keypoints_follow_the_deepfashion_convention(synth):
    root, _ = synth
    paths = [target for target, _ in read_pairs(root / "train_pairs.txt") + read_pairs(root / "test_pairs.txt")]
    missing = 0
    for path in paths:
        keypoints = load_keypoints(pose_path(root, path))
        present = (keypoints != -1).all(axis=1)
        missing += (~present).sum()
        assert present[1]  # the neck is always visible
        x, y = keypoints[present].T
        assert (x >= 40).all() and (x < 216).all() and (y >= 0).all() and (y < 256).all()
        if path.endswith("back.jpg"):
            assert not present[[0, 14, 15]].any()  # no face from the back
        if path.endswith("side.jpg"):
            assert not present[[14, 15]].all() and not present[[16, 17]].all()  # the far eye and ear
    assert missing > 0


def test_joints_lie_on_the_figure(synth):
    root, _ = synth
    dataset = PairDataset(root, size=64, split="train", augment=False)
    for target, _ in dataset.pairs:
        image = np.array(dataset.read_image(target)).astype(np.int16)
        background = np.median(image[0], axis=0)
        figure = cv2.dilate((np.abs(image - background).max(axis=2) > 40).astype(np.uint8), np.ones((3, 3)))
        keypoints = to_image_coords(dataset.load_keypoints(target), (64, 64))
        for x, y in keypoints[(keypoints != -1).all(axis=1)]:
            assert figure[int(y), int(x)], f"{target}: joint at ({x:.1f}, {y:.1f}) is on the background"


def test_sizes_show_the_same_figures(synth):
    root, _ = synth
    small, large = PairDataset(root, 32, "test"), PairDataset(root, 64, "test")
    for target, (source,) in small.pairs:
        reduced = cv2.resize(np.array(large.read_image(target)), (32, 32), interpolation=cv2.INTER_AREA)
        same = np.abs(reduced.astype(float) - np.array(small.read_image(target))).mean()
        other = np.abs(reduced.astype(float) - np.array(small.read_image(source))).mean()
        assert same < 12 and other > 2 * same


def test_deterministic_under_seed(tmp_path):
    def build(name, seed):
        root = tmp_path / name
        make_synthetic(root, num_identities=3, poses_per_identity=2, size=32, seed=seed, test_fraction=0.3)
        texts = {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*.txt"))}
        return texts, lmdb_items(root / "32-32")

    first, again, other = build("a", 0), build("b", 0), build("c", 1)
    assert first == again
    assert first[0] != other[0] and first[1] != other[1]


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="size"):
        make_synthetic(tmp_path, num_identities=2, poses_per_identity=2, size=8)
    with pytest.raises(ValueError, match="at least 2"):
        make_synthetic(tmp_path, num_identities=1, poses_per_identity=2, size=32)
    with pytest.raises(ValueError, match="test_fraction"):
        make_synthetic(tmp_path, num_identities=2, poses_per_identity=2, size=32, test_fraction=0)
    make_synthetic(tmp_path, num_identities=2, poses_per_identity=2, size=32)
    with pytest.raises(FileExistsError, match="overwrite"):
        make_synthetic(tmp_path, num_identities=2, poses_per_identity=2, size=32)
    make_synthetic(tmp_path, num_identities=2, poses_per_identity=3, size=32, overwrite=True)
    assert len(read_pairs(tmp_path / "train_pairs.txt")) == 3


def test_script(tmp_path, capsys):
    make_synthetic_script.main(["--root", str(tmp_path), "--identities", "2", "--poses", "2", "--sizes", "32"])
    assert "train_pairs: 2" in capsys.readouterr().out
    assert (tmp_path / "32-32" / "data.mdb").is_file()
    with pytest.raises(SystemExit) as exit:
        make_synthetic_script.main(["--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--root", "--identities", "--poses", "--sizes", "--seed", "--test-fraction", "--overwrite"):
        assert flag in text
