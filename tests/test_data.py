import io
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from data.deepfashion import PairDataset, pose_path, prepare_lmdbs, read_pairs
from data.lmdb import LMDBReader, LMDBWriter
from data.pose import FLIP_JOINTS, draw_skeleton, to_image_coords
from data.synthetic import make_synthetic
from eval.images import flat_name, image_key, pair_name
from scripts import prepare_deepfashion

TARGET = "img/WOMEN/Blouses_Shirts/id_00000637/03_1_front.jpg"
SOURCE = "img/MEN/Denim/id_00000080/01_7_additional.jpg"


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """6 figures x 4 poses at 64x64: 4 train identities (16 pairs), 2 test (8 pairs)."""
    root = tmp_path_factory.mktemp("synth")
    make_synthetic(root, num_identities=6, poses_per_identity=4, size=64, seed=1, test_fraction=0.34)
    return root


def png_bytes(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="png")
    return buffer.getvalue()


def test_names():
    assert flat_name(TARGET) == "fashionWOMENBlouses_Shirtsid0000063703_1front"
    assert flat_name(TARGET.replace(".jpg", ".png")) == flat_name(TARGET)
    assert pair_name(SOURCE, TARGET) == \
        "fashionMENDenimid0000008001_7additional_2_fashionWOMENBlouses_Shirtsid0000063703_1front_vis"
    with pytest.raises(ValueError, match="img/<group>"):
        flat_name("img/WOMEN/03_1_front.jpg")


def test_paths(tmp_path):
    assert image_key(TARGET) == "img/WOMEN/Blouses_Shirts/id_00000637/03_1_front.png"
    assert pose_path(tmp_path, TARGET) == tmp_path / "pose/WOMEN/Blouses_Shirts/id_00000637/03_1_front.txt"


def test_read_pairs(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text(f"{TARGET},{SOURCE}\n\n{SOURCE},{TARGET},{TARGET}\n")
    assert read_pairs(path) == [(TARGET, [SOURCE]), (SOURCE, [TARGET, TARGET])]
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_pairs(tmp_path / "missing.txt")
    path.write_text(f"{TARGET},{SOURCE}\n{TARGET}\n")
    with pytest.raises(ValueError, match="pairs.txt:2"):
        read_pairs(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match="no pairs"):
        read_pairs(path)


def test_test_split(synth):
    dataset = PairDataset(synth, size=64, split="test")
    assert len(dataset) == 8 and not dataset.augment
    item = dataset[3]
    target, sources = dataset.pairs[3]
    assert item["target_path"] == target and item["source_path"] == sources[0] and item["flip"] is False
    assert item["name"] == pair_name(sources[0], target)
    for key in ("target", "source", "target_skeleton"):
        assert item[key].shape == (3, 64, 64) and item[key].dtype == torch.float32
    assert item["target"].min() >= -1 and item["target"].max() <= 1 and item["target"].min() < 0
    assert item["target_skeleton"].min() == 0 and item["target_skeleton"].max() == 1
    assert torch.equal(item["target"], dataset.load_image(target))
    assert torch.equal(item["source"], dataset.load_image(sources[0]))
    assert torch.equal(item["target_skeleton"], dataset.skeleton(target))
    again = dataset[3]
    assert all(torch.equal(item[k], again[k]) for k in ("target", "source", "target_skeleton"))


def test_train_split_is_random_and_seeded(synth):
    dataset = PairDataset(synth, size=64, split="train")
    assert dataset.augment and len(dataset) == 16
    torch.manual_seed(0)
    first = [dataset[i % len(dataset)] for i in range(40)]
    torch.manual_seed(0)
    second = [dataset[i % len(dataset)] for i in range(40)]
    assert all(torch.equal(a["target"], b["target"]) and a["name"] == b["name"] for a, b in zip(first, second))
    assert {item["flip"] for item in first} == {True, False}
    swapped = 0
    for i, item in enumerate(first):
        target, sources = dataset.pairs[i % len(dataset)]
        if item["target_path"] == target:
            assert item["source_path"] in sources
        else:
            assert item["source_path"] == target and item["target_path"] in sources
            swapped += 1
    assert 5 < swapped < 35


def test_flip_moves_images_and_skeleton_together(synth):
    plain = PairDataset(synth, size=64, split="train", augment=False)
    for swap_lr in (False, True):
        dataset = PairDataset(synth, size=64, split="train", scale_jitter=0, swap_lr=swap_lr)
        torch.manual_seed(1)
        item = next(item for item in (dataset[i % len(dataset)] for i in range(50)) if item["flip"])
        target, source = item["target_path"], item["source_path"]
        assert torch.equal(item["target"], plain.load_image(target).flip(-1))
        assert torch.equal(item["source"], plain.load_image(source).flip(-1))
        keypoints = to_image_coords(plain.load_keypoints(target), (64, 64))
        if swap_lr:  # left and right limbs keep their colours
            keypoints = keypoints[FLIP_JOINTS]
        assert torch.equal(item["target_skeleton"], draw_skeleton(keypoints, (64, 64)).flip(-1))


def test_choose_makes_the_choices_of_an_item(synth):
    """What a feature cache relies on: without scale jitter, an item is `choose` plus pixels."""
    dataset = PairDataset(synth, size=64, split="train", scale_jitter=0)
    for index in range(len(dataset)):
        torch.manual_seed(index)
        target, source, flip = dataset.choose(index)
        torch.manual_seed(index)
        item = dataset[index]
        assert (item["target_path"], item["source_path"], item["flip"]) == (target, source, flip)
        assert torch.equal(item["target_skeleton"], dataset.skeleton(target, flip))
    test = PairDataset(synth, size=64, split="test")
    assert [test.pair_name(i) for i in range(len(test))] == [test[i]["name"] for i in range(len(test))]
    assert test.choose(2) == (test.pairs[2][0], test.pairs[2][1][0], False)


def overlap(skeleton, image):
    """The fraction of skeleton pixels on the figure (pixels unlike the top row's background, dilated)."""
    background = image[:, 0].median(dim=1).values[:, None, None]
    figure = ((image - background).abs().amax(0) > 0.3).float()
    figure = F.max_pool2d(figure[None, None], 7, stride=1, padding=3)[0, 0] > 0
    drawn = skeleton.amax(0) > 0
    return (drawn & figure).sum().item() / drawn.sum().item()


def test_augmented_skeleton_lies_on_the_figure(synth):
    dataset = PairDataset(synth, size=64, split="train", scale_jitter=0.2)
    torch.manual_seed(2)
    assert np.mean([overlap(item["target_skeleton"], item["target"]) for item in dataset]) > 0.95


def centroid(weights):
    ys, xs = torch.meshgrid(torch.arange(weights.shape[0]), torch.arange(weights.shape[1]), indexing="ij")
    return torch.stack([(xs * weights).sum(), (ys * weights).sum()]) / weights.sum()


def test_scale_jitter_and_flip_keypoints_follow_the_image(tmp_path):
    """An image that is black but for a white dot at the only joint: after random scaling, cropping and
    flipping, the dot and the drawn joint must still coincide."""
    name = "img/A/B/id_00000001/01_1_front.jpg"
    (tmp_path / "train_pairs.txt").write_text(f"{name},{name}\n")
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[27:30, 19:22] = 255  # centred on (x, y) = (20, 28)
    with LMDBWriter(tmp_path / "64-64") as writer:
        writer.put(image_key(name), png_bytes(pixels))
    pose = pose_path(tmp_path, name)
    pose.parent.mkdir(parents=True)
    pose.write_text("-1 -1\n" + f"{40 + 20 * 176 / 64} {28 * 256 / 64}\n" + "-1 -1\n" * 16)
    dataset = PairDataset(tmp_path, size=64, split="train", scale_jitter=0.5)
    torch.manual_seed(0)
    shifts = []
    for _ in range(12):
        item = dataset[0]
        dot = centroid((item["target"].mean(0) - 0.1).clamp(min=0))
        joint = centroid(item["target_skeleton"].amax(0))
        assert (dot - joint).abs().max() < 1.5
        shifts.append(dot - torch.tensor([20.0, 28.0]))
    assert torch.stack(shifts).abs().max() > 8  # the augmentation did move the dot


def test_multiple_workers_match_one_process(synth):
    dataset = PairDataset(synth, size=64, split="test")
    dataset[0]  # an LMDB opened before forking must not be shared with the workers
    pickle.loads(pickle.dumps(dataset))
    single = list(DataLoader(dataset, batch_size=3, num_workers=0))
    multi = list(DataLoader(dataset, batch_size=3, num_workers=2))
    assert len(single) == len(multi) == 3
    for a, b in zip(single, multi):
        assert a["name"] == b["name"]
        for key in ("target", "source", "target_skeleton"):
            assert torch.equal(a[key], b[key])


def test_multiple_workers_are_seeded_by_the_generator(synth):
    dataset = PairDataset(synth, size=64, split="train")

    def load():
        loader = DataLoader(dataset, batch_size=4, shuffle=True, num_workers=2,
                            generator=torch.Generator().manual_seed(5))
        return list(loader)

    first, second = load(), load()
    for a, b in zip(first, second):
        assert a["name"] == b["name"] and torch.equal(a["flip"], b["flip"])
        assert torch.equal(a["target"], b["target"]) and torch.equal(a["target_skeleton"], b["target_skeleton"])


def test_512_layout(tmp_path):
    make_synthetic(tmp_path, num_identities=2, poses_per_identity=2, size=512, seed=3, test_fraction=0.5)
    assert (tmp_path / "512-512" / "data.mdb").is_file()
    item = PairDataset(tmp_path, size=512, split="test")[0]
    assert item["target"].shape == item["target_skeleton"].shape == (3, 512, 512)
    with pytest.raises(FileNotFoundError, match="256-256"):
        PairDataset(tmp_path, size=256, split="test")


def test_dataset_errors(tmp_path):
    good = "img/A/B/id_00000001/01_1_front.jpg"
    nopose = "img/A/B/id_00000001/01_2_side.jpg"
    corrupt = "img/A/B/id_00000001/01_3_back.jpg"
    small = "img/A/B/id_00000001/01_4_full.jpg"
    absent = "img/A/B/id_00000001/01_7_additional.jpg"
    with pytest.raises(FileNotFoundError, match="test_pairs.txt"):
        PairDataset(tmp_path, size=64, split="test")
    (tmp_path / "test_pairs.txt").write_text(f"{good},{nopose}\n{good},{corrupt}\n{good},{small}\n{absent},{good}\n")
    with pytest.raises(FileNotFoundError, match="64-64"):
        PairDataset(tmp_path, size=64, split="test")
    with LMDBWriter(tmp_path / "64-64") as writer:
        writer.put(image_key(good), png_bytes(np.zeros((64, 64, 3), np.uint8)))
        writer.put(image_key(nopose), png_bytes(np.zeros((64, 64, 3), np.uint8)))
        writer.put(image_key(corrupt), b"not a png")
        writer.put(image_key(small), png_bytes(np.zeros((32, 32, 3), np.uint8)))
    pose = pose_path(tmp_path, good)
    pose.parent.mkdir(parents=True)
    pose.write_text("50 60\n" * 18)
    with pytest.raises(ValueError, match="split"):
        PairDataset(tmp_path, size=64, split="val")
    dataset = PairDataset(tmp_path, size=64, split="test")
    assert dataset[0]["target"].shape == (3, 64, 64)  # the target's pose is the one drawn
    with pytest.raises(ValueError, match=r"01_3_back\.png.*not a readable image"):
        dataset[1]
    with pytest.raises(ValueError, match=r"32x32, expected 64x64"):
        dataset[2]
    with pytest.raises(KeyError, match=r"64-64 has no entry .*01_7_additional\.png"):
        dataset[3]
    with pytest.raises(FileNotFoundError, match=r"pose/A/B/id_00000001/01_2_side\.txt"):
        dataset.skeleton(nopose)


def lmdb_items(path):
    reader = LMDBReader(path)
    return {key: bytes(reader.get(key)) for key in reader.keys()}


def make_raw(root, names):
    """A fake raw DeepFashion folder: 88x128 JPEGs, pair files, pose files."""
    rng = np.random.default_rng(0)
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (128, 88, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, quality=95)
        pose = pose_path(root, name)
        pose.parent.mkdir(parents=True, exist_ok=True)
        pose.write_text("".join(f"{60 + i} {10 + 12 * i}\n" for i in range(18)))
    (root / "train_pairs.txt").write_text(f"{names[0]},{names[1]},{names[2]}\n{names[1]},{names[0]}\n")
    (root / "test_pairs.txt").write_text(f"{names[3]},{names[2]}\n")


RAW = ["img/WOMEN/Dresses/id_00000001/01_1_front.jpg", "img/WOMEN/Dresses/id_00000001/01_2_side.jpg",
       "img/MEN/Denim/id_00000002/02_3_back.jpg", "img/MEN/Denim/id_00000002/02_4_full.jpg"]


def test_prepare_lmdbs(tmp_path):
    make_raw(tmp_path, RAW)
    written = prepare_lmdbs(tmp_path, sizes=[64, 32], workers=1, progress=False)
    assert written == [tmp_path / "32-32", tmp_path / "64-64"]
    assert not list(tmp_path.glob("*.partial"))
    dataset = PairDataset(tmp_path, size=64, split="test")
    with Image.open(tmp_path / RAW[3]) as raw:
        expected = np.array(raw.convert("RGB").resize((64, 64), Image.BICUBIC))
    assert np.array_equal(np.array(dataset.read_image(RAW[3])), expected)
    assert dataset[0]["name"] == pair_name(RAW[2], RAW[3])
    assert PairDataset(tmp_path, size=32, split="train").load_image(RAW[0]).shape == (3, 32, 32)
    with pytest.raises(FileExistsError, match="64-64"):
        prepare_lmdbs(tmp_path, sizes=[64], progress=False)
    prepare_lmdbs(tmp_path, sizes=[64], out=tmp_path / "out", workers=2, progress=False)
    assert lmdb_items(tmp_path / "out" / "64-64") == lmdb_items(tmp_path / "64-64")
    assert sorted(lmdb_items(tmp_path / "64-64")) == sorted(image_key(name) for name in RAW)
    prepare_lmdbs(tmp_path, sizes=[64], overwrite=True, progress=False)


def test_prepare_refuses_missing_images(tmp_path):
    make_raw(tmp_path, RAW)
    (tmp_path / RAW[1]).unlink()
    (tmp_path / RAW[2]).unlink()
    with pytest.raises(FileNotFoundError, match="2 of 4 images") as error:
        prepare_lmdbs(tmp_path, sizes=[32], progress=False)
    assert RAW[1] in str(error.value) and RAW[2] in str(error.value)
    assert not (tmp_path / "32-32").exists() and not (tmp_path / "32-32.partial").exists()


def test_prepare_script(tmp_path, capsys):
    make_raw(tmp_path, RAW)
    prepare_deepfashion.main(["--root", str(tmp_path), "--sizes", "32", "--workers", "1"])
    assert "32-32" in capsys.readouterr().out
    assert PairDataset(tmp_path, size=32, split="test")[0]["target"].shape == (3, 32, 32)
    with pytest.raises(SystemExit) as exit:
        prepare_deepfashion.main(["--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--root", "--out", "--sizes", "--workers", "--overwrite"))
