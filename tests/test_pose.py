import json

import numpy as np
import pytest
import torch
from conftest import COCO18_NAMES

from data.pose import (BODY25_TO_COCO18, FLIP_JOINTS, LIMBS, draw_skeleton, from_image_coords, load_keypoints,
                       to_image_coords)


def rel_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def write_txt(path, rows):
    path.write_text("".join(f"{x} {y}\n" for x, y in rows))
    return path


def write_openpose(path, values):
    path.write_text(json.dumps({"version": 1.3, "people": [{"pose_keypoints_2d": values}]}))
    return path


def test_fixture_skeletons(parity):
    """The fixture's keypoints are in the DeepFashion convention: mapped to the image, then drawn."""
    pose = parity["pose"]
    for keypoints, reference in zip(pose["keypoints"], pose["rendered"]):
        skeleton = draw_skeleton(to_image_coords(keypoints.numpy(), (256, 256)), (256, 256))
        assert skeleton.shape == (3, 256, 256) and skeleton.dtype == torch.float32
        assert (skeleton - reference.float()).abs().max() <= 1 / 255
        assert torch.equal(skeleton.half(), reference)  # the fixture stores them rounded to half


def test_to_image_coords_and_back():
    keypoints = np.full((18, 2), -1.0, dtype=np.float32)
    keypoints[0] = 40, 0
    keypoints[1] = 216, 128
    keypoints[2] = -1, 50  # one coordinate missing: the joint is missing
    out = to_image_coords(keypoints, (512, 352))
    assert out[0].tolist() == [0, 0]
    assert out[1].tolist() == [352, 256]
    assert (out[2:] == -1).all()
    back = from_image_coords(out, (512, 352))
    assert np.allclose(back[:2], keypoints[:2])
    assert (back[2:] == -1).all()
    with pytest.raises(ValueError, match="shape"):
        to_image_coords(np.zeros((17, 2)), (256, 256))


def test_draw_skeleton_edge_cases():
    empty = draw_skeleton(np.full((18, 2), -1.0), (64, 48))
    assert empty.shape == (3, 64, 48) and not empty.any()
    one = np.full((18, 2), -1.0)
    one[1] = 20, 30
    skeleton = draw_skeleton(one, (64, 48))
    assert skeleton.max() == 1 and skeleton[:, 30, 20].any() and not skeleton[:, 5, 5].any()
    with pytest.raises(ValueError, match="shape"):
        draw_skeleton(np.zeros((18, 3)), (64, 64))


def test_flip_joints_swap_left_and_right():
    """Each joint's mirror is the joint named with left and right swapped; the nose and neck stay."""
    swap = {"left": "right", "right": "left"}
    mirrors = ["_".join(swap.get(word, word) for word in name.split("_")) for name in COCO18_NAMES]
    assert FLIP_JOINTS == [COCO18_NAMES.index(mirror) for mirror in mirrors]
    assert len(LIMBS) == 17


def test_load_deepfashion_txt(tmp_path):
    rows = [(float(40 + i), float(2 * i)) for i in range(18)]
    rows[3] = (-1, -1)
    keypoints = load_keypoints(write_txt(tmp_path / "a.txt", rows))
    assert keypoints.dtype == np.float32 and keypoints.shape == (18, 2)
    assert keypoints[4].tolist() == [44, 8] and keypoints[3].tolist() == [-1, -1]


@pytest.mark.parametrize("text, match", [
    ("1 2\n" * 17, "expected 18 lines"),
    ("1 2\n" * 19, "expected 18 lines"),
    ("1 2\n" * 5 + "1 x\n" + "1 2\n" * 12, "line 6 must be two numbers"),
    ("1 2\n" * 5 + "1 2 3\n" + "1 2\n" * 12, "line 6 must be two numbers"),
    ("1 2\n" * 5 + "nan 2\n" + "1 2\n" * 12, "NaN"),
])
def test_load_deepfashion_txt_errors(tmp_path, text, match):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as error:
        load_keypoints(path)
    assert "bad.txt" in str(error.value)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_keypoints(tmp_path / "nope.txt")


def test_load_openpose_coco18(tmp_path):
    values = []
    for i in range(18):
        values += [10.0 + i, 20.0 + i, 0.05 if i == 7 else 0.9]
    keypoints = load_keypoints(write_openpose(tmp_path / "p.json", values))
    assert keypoints.dtype == np.float32 and keypoints.shape == (18, 2)
    assert keypoints[0].tolist() == [10, 20] and keypoints[17].tolist() == [27, 37]
    assert keypoints[7].tolist() == [-1, -1]  # confidence below 0.1
    assert load_keypoints(tmp_path / "p.json", min_confidence=0.01)[7].tolist() == [17, 27]


def test_load_openpose_body25(tmp_path):
    values = []
    for i in range(25):
        values += [100.0 + i, 200.0 + i, 0.0 if i == 13 else 0.8]  # 13: left knee, not detected
    keypoints = load_keypoints(write_openpose(tmp_path / "p.json", values))
    assert keypoints[:8, 0].tolist() == [100 + i for i in range(8)]  # nose .. left wrist
    assert keypoints[8].tolist() == [109, 209]  # right hip is BODY_25's 9 (8 is the mid-hip)
    assert keypoints[11].tolist() == [112, 212]  # left hip
    assert keypoints[12].tolist() == [-1, -1]  # left knee
    assert keypoints[17].tolist() == [118, 218]  # left ear
    assert BODY25_TO_COCO18[8:11] == [9, 10, 11]


@pytest.mark.parametrize("content, error, match", [
    ({"people": []}, KeyError, "people"),
    ({"version": 1}, KeyError, "people"),
    ({"people": [{"pose_keypoints_2d": [1.0] * 30}]}, ValueError, "54 .* or 75"),
    ({"people": [{"pose_keypoints_2d": ["a"] * 54}]}, ValueError, "numbers"),
    ({"people": [{"pose_keypoints_2d": [float("nan")] * 54}]}, ValueError, "NaN"),
])
def test_load_openpose_errors(tmp_path, content, error, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(error, match=match):
        load_keypoints(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_keypoints(path)
