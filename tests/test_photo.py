import sys

import numpy as np
import pytest
import torch
from PIL import Image

from data import photo
from data.deepfashion import to_tensor
from data.photo import (coco18_from_mediapipe, detect_keypoints, fit_photo, keypoints_from_photo,
                        photo_keypoints_to_deepfashion, read_photo)
from data.pose import to_image_coords

SIZE = 128
RED = (230, 20, 20)
SHAPES = [(300, 150), (200, 400), (256, 176)]  # (H, W): taller than 176:256, wider, exactly it


def make_photo(height, width, dot, radius=6):
    """White photo, a blue block (the person) in the middle, a red disc centred on pixel `dot` (x, y)."""
    rgb = np.full((height, width, 3), 255, dtype=np.uint8)
    rgb[height // 4:height - height // 4, width // 4:width - width // 4] = (40, 60, 200)
    yy, xx = np.mgrid[:height, :width]
    rgb[(xx - dot[0]) ** 2 + (yy - dot[1]) ** 2 <= radius ** 2] = RED
    return rgb


def centroid(mask):
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def single_keypoint(x, y):
    keypoints = np.full((18, 2), -1.0, dtype=np.float32)
    keypoints[0] = x, y
    return keypoints


@pytest.mark.parametrize("shape", SHAPES)
def test_fit_photo_pads_white_and_centres(shape):
    height, width = shape
    rgb = make_photo(height, width, dot=(width // 2, height // 2))
    image, fit = fit_photo(rgb, SIZE)
    assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
    assert -1 <= image.min() and image.max() <= 1
    assert abs(fit.canvas_width / fit.canvas_height - 176 / 256) < 1 / fit.canvas_height
    assert fit.canvas_width >= width and fit.canvas_height >= height
    assert min(fit.left, fit.top) == 0  # padded along one axis only
    pixels = image.permute(1, 2, 0).numpy()
    # The padding, away from the photo's edge (where bicubic rings), is pure white.
    pad_x = int(fit.left * SIZE / fit.canvas_width) - 2
    pad_y = int(fit.top * SIZE / fit.canvas_height) - 2
    if pad_x > 0:
        assert (pixels[:, :pad_x] == 1).all() and (pixels[:, SIZE - pad_x:] == 1).all()
    if pad_y > 0:
        assert (pixels[:pad_y] == 1).all() and (pixels[SIZE - pad_y:] == 1).all()
    # The person, centred in the photo, is centred in the fitted image.
    person = (pixels[..., 2] > 0) & (pixels[..., 0] < -0.2)
    assert np.abs(centroid(person) - (SIZE - 1) / 2).max() < 0.75


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dot", [(0.3, 0.2), (0.75, 0.85)])
def test_keypoint_on_a_dot_lands_on_it_in_the_fitted_image(shape, dot):
    height, width = shape
    x, y = round(dot[0] * width), round(dot[1] * height)
    image, fit = fit_photo(make_photo(height, width, dot=(x, y)), SIZE)
    deepfashion = photo_keypoints_to_deepfashion(single_keypoint(x, y), fit)
    assert deepfashion.dtype == np.float32
    assert (deepfashion[1:] == -1).all()
    assert 40 <= deepfashion[0, 0] <= 216 and 0 <= deepfashion[0, 1] <= 256
    placed = to_image_coords(deepfashion, (SIZE, SIZE))[0]
    pixels = image.permute(1, 2, 0).numpy()
    red = (pixels[..., 0] > 0.3) & (pixels[..., 1] < -0.3) & (pixels[..., 2] < -0.3)
    assert np.abs(centroid(red) - placed).max() < 0.5
    column, row = np.round(placed).astype(int)
    assert red[row, column]


def test_deepfashion_picture_is_fitted_like_the_training_images():
    """A 176x256 DeepFashion picture: no padding, the LMDB's plain bicubic resize, and its keypoints come
    back in the dataset's convention (x + 40, y), up to the half-pixel the resize shifts pixel centres."""
    rgb = make_photo(256, 176, dot=(60, 90))
    image, fit = fit_photo(rgb, 256)
    assert (fit.left, fit.top, fit.canvas_width, fit.canvas_height) == (0, 0, 176, 256)
    assert torch.equal(image, to_tensor(Image.fromarray(rgb).resize((256, 256), Image.BICUBIC)))
    deepfashion = photo_keypoints_to_deepfashion(single_keypoint(60, 90), fit)
    assert np.abs(deepfashion[0] - (100, 90)).max() < 0.2


def test_fit_photo_rejects_bad_input():
    with pytest.raises(ValueError, match="RGB uint8"):
        fit_photo(np.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="RGB uint8"):
        fit_photo(np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(ValueError, match="size"):
        fit_photo(np.zeros((10, 10, 3), dtype=np.uint8), 0)
    with pytest.raises(ValueError, match="shape"):
        photo_keypoints_to_deepfashion(np.zeros((17, 2)), fit_photo(np.zeros((10, 10, 3), np.uint8))[1])


def test_read_photo(tmp_path):
    rgb = make_photo(40, 30, dot=(10, 10))
    Image.fromarray(rgb).save(tmp_path / "a.png")
    read = read_photo(tmp_path / "a.png")
    assert read.dtype == np.uint8 and np.array_equal(read, rgb)
    # Transparent pixels become white, as DeepFashion's background.
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    rgba[5:10, 5:10] = (10, 20, 30, 255)
    Image.fromarray(rgba).save(tmp_path / "b.png")
    read = read_photo(tmp_path / "b.png")
    assert (read[0, 0] == 255).all() and (read[7, 7] == (10, 20, 30)).all()
    # A phone photo stored sideways with an EXIF rotation comes out upright.
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(rgb).save(tmp_path / "c.jpg", exif=exif)
    assert read_photo(tmp_path / "c.jpg").shape == (30, 40, 3)


def test_read_photo_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.jpg"):
        read_photo(tmp_path / "nothing.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg"):
        read_photo(tmp_path / "broken.jpg")


# COCO-18 joint -> MediaPipe Pose landmark, written out by name (MediaPipe's documented indices).
COCO18_FROM_MEDIAPIPE_NAMES = {
    0: 0,    # nose
    2: 12,   # right shoulder
    3: 14,   # right elbow
    4: 16,   # right wrist
    5: 11,   # left shoulder
    6: 13,   # left elbow
    7: 15,   # left wrist
    8: 24,   # right hip
    9: 26,   # right knee
    10: 28,  # right ankle
    11: 23,  # left hip
    12: 25,  # left knee
    13: 27,  # left ankle
    14: 5,   # right eye
    15: 2,   # left eye
    16: 8,   # right ear
    17: 7,   # left ear
}


def hand_made_landmarks():
    """33 landmarks at distinct places inside the image, all visible."""
    index = np.arange(33)
    return np.stack([(index + 1) / 40, (index + 1) / 50, np.full(33, 0.9)], axis=1)


def test_coco18_from_mediapipe():
    landmarks = hand_made_landmarks()
    height, width = 100, 200
    keypoints = coco18_from_mediapipe(landmarks, (height, width))
    assert keypoints.shape == (18, 2) and keypoints.dtype == np.float32
    for joint, landmark in COCO18_FROM_MEDIAPIPE_NAMES.items():
        expected = landmarks[landmark, 0] * width - 0.5, landmarks[landmark, 1] * height - 0.5
        np.testing.assert_allclose(keypoints[joint], expected, rtol=1e-6)
    np.testing.assert_allclose(keypoints[1], (keypoints[2] + keypoints[5]) / 2)


def test_coco18_from_mediapipe_drops_unseen_and_outside_landmarks():
    landmarks = hand_made_landmarks()
    landmarks[11, 2] = 0.3   # left shoulder barely visible: it and the neck are missing
    landmarks[26, 1] = 1.2   # right knee below the image
    landmarks[0, 0] = -0.01  # nose left of the image
    keypoints = coco18_from_mediapipe(landmarks, (100, 200), min_visibility=0.5)
    missing = set(np.flatnonzero((keypoints == -1).all(axis=1)))
    assert missing == {0, 1, 5, 9}
    assert (coco18_from_mediapipe(landmarks, (100, 200), min_visibility=0.2)[[1, 5]] != -1).all()
    with pytest.raises(ValueError, match="33"):
        coco18_from_mediapipe(landmarks[:17], (100, 200))


def test_detect_keypoints_errors(monkeypatch):
    rgb = np.full((64, 48, 3), 255, dtype=np.uint8)
    monkeypatch.setattr(photo, "_detect_landmarks", lambda rgb: None)
    with pytest.raises(ValueError, match="me.jpg: no person"):
        detect_keypoints(rgb, name="me.jpg")
    landmarks = hand_made_landmarks()
    landmarks[:, 2] = 0.1
    landmarks[[0, 2, 5], 2] = 0.9  # only the nose and the eyes
    monkeypatch.setattr(photo, "_detect_landmarks", lambda rgb: landmarks)
    with pytest.raises(ValueError, match="me.jpg: only 3 of 18 joints"):
        detect_keypoints(rgb, name="me.jpg")
    assert (detect_keypoints(rgb, min_joints=3) != -1).all(axis=1).sum() == 3


def test_missing_mediapipe_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mediapipe", None)  # makes `import mediapipe` fail
    with pytest.raises(ImportError, match=r"pip install mediapipe==0\.10\.14"):
        detect_keypoints(np.zeros((8, 8, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def mediapipe_pose():
    try:
        return photo._pose_solution()
    except ImportError as e:
        pytest.skip(f"MediaPipe Pose not usable here: {e}")


@pytest.fixture(scope="module")
def astronaut():
    data = pytest.importorskip("skimage.data")
    return data.astronaut()


@pytest.fixture(scope="module")
def astronaut_keypoints(mediapipe_pose, astronaut):
    return detect_keypoints(astronaut, name="astronaut")


def test_astronaut_keypoints(astronaut_keypoints):
    """A 512x512 waist-up portrait facing the camera: head and shoulders found, hips and legs not."""
    keypoints = astronaut_keypoints
    found = (keypoints != -1).all(axis=1)
    nose, neck, r_shoulder, l_shoulder = keypoints[[0, 1, 2, 5]]
    r_eye, l_eye, r_ear, l_ear = keypoints[[14, 15, 16, 17]]
    assert found[[0, 1, 2, 5, 14, 15, 16, 17]].all()
    assert 180 < nose[0] < 270 and 90 < nose[1] < 170
    # Facing the camera: her right side is on the image's left.
    assert r_ear[0] < r_eye[0] < nose[0] < l_eye[0] < l_ear[0]
    assert max(r_eye[1], l_eye[1]) < nose[1]
    assert r_shoulder[0] < nose[0] - 60 and l_shoulder[0] > nose[0] + 60
    assert 200 < r_shoulder[1] < 300 and 200 < l_shoulder[1] < 300
    np.testing.assert_allclose(neck, (r_shoulder + l_shoulder) / 2)
    assert not found[[8, 9, 10, 11, 12, 13]].any()  # hips, knees, ankles: below the frame


def test_photo_without_a_person(mediapipe_pose):
    with pytest.raises(ValueError, match="blank.png: no person"):
        detect_keypoints(np.full((256, 256, 3), 255, dtype=np.uint8), name="blank.png")


def test_keypoints_from_photo(astronaut, astronaut_keypoints, tmp_path):
    path = tmp_path / "astronaut.png"
    Image.fromarray(astronaut).save(path)
    deepfashion = keypoints_from_photo(path, size=SIZE)
    _, fit = fit_photo(astronaut, SIZE)
    expected = photo_keypoints_to_deepfashion(astronaut_keypoints, fit)
    np.testing.assert_array_equal(deepfashion, expected)
    # The square portrait is wider than 176:256, so padded above and below: the nose keeps its place
    # across and moves down by the top padding.
    assert fit.left == 0 and fit.top > 0
    nose_photo = astronaut_keypoints[0]
    nose = to_image_coords(deepfashion, (SIZE, SIZE))[0]
    assert abs(nose[0] - nose_photo[0] * SIZE / astronaut.shape[1]) < 1
    assert fit.top * SIZE / fit.canvas_height < nose[1] < SIZE / 2
