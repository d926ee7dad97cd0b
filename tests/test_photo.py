import sys

import numpy as np
import pytest
import torch
from conftest import COCO18_NAMES, optional
from PIL import Image

from data import photo
from data.images import to_tensor
from data.photo import (MEDIAPIPE_TO_COCO18, coco18_from_mediapipe, detect_person, fit_photo, frame_photo, person_crop,
                        photo_keypoints_to_deepfashion, read_photo)
from data.pose import load_keypoints, save_openpose_json, to_image_coords

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


def fitted_by_the_rule(rgb, size):
    """fit_photo's rule, built here: pad with white to the 176:256 aspect (the nearest whole number of
    pixels), centred, an odd pixel going right or below; then PIL bicubic to size x size. The fitted
    picture, uint8 (size, size, 3), and the padding on the left and on top."""
    height, width = rgb.shape[:2]
    pad_x = max(0, int(height * 176 / 256 + 0.5) - width)
    pad_y = max(0, int(width * 256 / 176 + 0.5) - height)
    left, top = pad_x // 2, pad_y // 2
    padded = np.pad(rgb, ((top, pad_y - top), (left, pad_x - left), (0, 0)), constant_values=255)
    return np.array(Image.fromarray(padded).resize((size, size), Image.BICUBIC)), left, top


@pytest.mark.parametrize("shape", [(300, 150), (301, 150), (200, 400), (199, 400), (256, 176)])
def test_fit_photo_pads_white_and_centres(shape):
    """Tall, wide (each with an even and an odd padding) and exactly 176:256 photos of noise, so that
    every photo pixel differs from the padding, fitted exactly as the rule builds them."""
    rgb = np.random.default_rng(0).integers(0, 255, (*shape, 3), dtype=np.uint8)
    image, fit = fit_photo(rgb, SIZE)
    expected, left, top = fitted_by_the_rule(rgb, SIZE)
    assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
    np.testing.assert_array_equal(((image.permute(1, 2, 0) + 1) * 127.5).round().numpy(), expected)
    assert (fit.left, fit.top, fit.size) == (left, top, SIZE)


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


def hand_made_landmarks():
    """33 landmarks at distinct places inside the image, all visible."""
    index = np.arange(33)
    return np.stack([(index + 1) / 40, (index + 1) / 50, np.full(33, 0.9)], axis=1)


@pytest.mark.parametrize("height, width", [(48, 1000), (1000, 48)])
def test_coco18_from_mediapipe_scales_x_by_width_and_y_by_height(height, width):
    """Landmarks put on pixels (x, y) of a very wide or very tall image, normalised as MediaPipe does,
    ((x + 0.5) / W, (y + 0.5) / H) with (0, 0) the top-left pixel's centre, come back as (x, y); the neck
    is the midpoint of the shoulders."""
    rng = np.random.default_rng(0)
    pixels = np.stack([rng.integers(0, width, 33), rng.integers(0, height, 33)], axis=1)
    landmarks = np.column_stack([(pixels + 0.5) / (width, height), np.full(33, 0.9)])
    keypoints = coco18_from_mediapipe(landmarks, (height, width))
    assert keypoints.shape == (18, 2) and keypoints.dtype == np.float32
    for joint, landmark in enumerate(MEDIAPIPE_TO_COCO18):
        if landmark is not None:
            np.testing.assert_allclose(keypoints[joint], pixels[landmark], atol=1e-3)
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


def test_detect_person_errors(monkeypatch):
    rgb = np.full((64, 48, 3), 255, dtype=np.uint8)
    monkeypatch.setattr(photo, "_detect", lambda rgb: None)
    with pytest.raises(ValueError, match="me.jpg: no person found"):
        detect_person(rgb, name="me.jpg")
    landmarks = hand_made_landmarks()
    landmarks[:, 2] = 0.1
    landmarks[[0, 2, 5], 2] = 0.9  # only the nose and the eyes
    monkeypatch.setattr(photo, "_detect", lambda rgb: (landmarks, np.zeros(rgb.shape[:2])))
    with pytest.raises(ValueError, match="me.jpg: only 3 of 18 joints found"):
        detect_person(rgb, name="me.jpg", min_joints=4)
    assert (detect_person(rgb, min_joints=3).keypoints != -1).all(axis=1).sum() == 3
    landmarks[:, 2] = 0.1  # landmarks, none of them visible, and an empty mask: no one to frame
    with pytest.raises(ValueError, match="me.jpg: no person found"):
        detect_person(rgb, name="me.jpg")


def test_person_box_covers_the_mask_and_the_joints(monkeypatch):
    """The person's box holds every pixel of the segmentation mask (hair and feet, which no joint marks) and
    every joint; right and bottom are exclusive."""
    rgb = np.zeros((100, 80, 3), dtype=np.uint8)
    mask = np.zeros((100, 80))
    mask[10:60, 20:41] = 0.9
    landmarks = hand_made_landmarks()
    landmarks[:, 2] = 0.1
    landmarks[0] = ((70 + 0.5) / 80, (90 + 0.5) / 100, 0.9)  # the nose at pixel (70, 90), outside the mask
    monkeypatch.setattr(photo, "_detect", lambda rgb: (landmarks, mask))
    assert detect_person(rgb).box == (20, 10, 71, 91)


def test_missing_mediapipe_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mediapipe", None)  # makes `import mediapipe` fail
    with pytest.raises(ImportError, match=r"pip install mediapipe==0\.10\.14"):
        detect_person(np.zeros((8, 8, 3), dtype=np.uint8))


def test_person_crop_adds_the_margin_and_stays_in_the_photo():
    """5% of the person's height on every side (their box is 200 high: 10 pixels), clipped to the photo."""
    assert person_crop((100, 50, 160, 250), 400, 300) == (90, 40, 170, 260)
    assert person_crop((5, 3, 295, 398), 400, 300) == (0, 0, 300, 400)


def test_openpose_json_round_trip(tmp_path):
    keypoints = np.full((18, 2), -1, dtype=np.float32)
    keypoints[[0, 1, 2, 5, 8]] = [[100.25, 30.5], [101, 60], [80, 61], [122, 62], [90, 130]]
    save_openpose_json(keypoints, tmp_path / "p.json")
    np.testing.assert_array_equal(load_keypoints(tmp_path / "p.json"), keypoints)


@pytest.fixture(scope="module")
def mediapipe_pose():
    return optional("MediaPipe Pose", photo._pose_solution)


@pytest.fixture(scope="module")
def astronaut():
    return optional("skimage.data").astronaut()


def test_mediapipe_to_coco18_by_name(mediapipe_pose):
    """Each COCO-18 joint is MediaPipe's landmark of the same name; the neck, which MediaPipe has no landmark
    for, is None."""
    landmark = mediapipe_pose.PoseLandmark
    expected = [None if name == "neck" else landmark[name.upper()] for name in COCO18_NAMES]
    assert MEDIAPIPE_TO_COCO18 == expected


@pytest.fixture(scope="module")
def astronaut_keypoints(mediapipe_pose, astronaut):
    return detect_person(astronaut, name="astronaut").keypoints


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


@pytest.mark.parametrize("top, left, height, width", [(0, 76, 512, 360), (40, 16, 320, 496)])
def test_keypoints_of_a_cropped_photo(astronaut, astronaut_keypoints, tmp_path, top, left, height, width):
    """A tall and a wide crop of the portrait: the head (nose, eyes, ears, where MediaPipe agrees with
    itself across crops) is found where it was in the whole photo, less the crop's offset, so x follows
    the width and y the height; the photo file's keypoints are those, mapped through the crop's fit."""
    crop = np.ascontiguousarray(astronaut[top:top + height, left:left + width])
    keypoints = detect_person(crop, name="crop").keypoints
    head = [0, 14, 15, 16, 17]
    np.testing.assert_allclose(keypoints[head], astronaut_keypoints[head] - (left, top), atol=6)
    Image.fromarray(crop).save(tmp_path / "crop.png")
    _, fit = fit_photo(crop, SIZE)
    np.testing.assert_array_equal(frame_photo(read_photo(tmp_path / "crop.png"), SIZE, framing="whole").keypoints,
                                  photo_keypoints_to_deepfashion(keypoints, fit))


@pytest.mark.parametrize("photo_name", ["coffee", "rocket"])
def test_photos_without_a_person(mediapipe_pose, photo_name):
    """Real photographs of things: a cup of coffee, a rocket on its launch pad."""
    rgb = getattr(optional("skimage.data"), photo_name)()
    with pytest.raises(ValueError, match=f"{photo_name}.jpg: no person found"):
        detect_person(rgb, name=f"{photo_name}.jpg")
    with pytest.raises(ValueError, match="no person found"):
        frame_photo(np.full((256, 256, 3), 255, dtype=np.uint8), SIZE)


def test_whole_framing_pads_the_photo(astronaut, astronaut_keypoints):
    """framing='whole': the square portrait, wider than 176:256, padded above and below; the nose keeps its
    place across and moves down by the top padding."""
    framed = frame_photo(astronaut, SIZE, framing="whole")
    _, fit = fit_photo(astronaut, SIZE)
    np.testing.assert_array_equal(framed.keypoints, photo_keypoints_to_deepfashion(astronaut_keypoints, fit))
    assert fit.left == 0 and fit.top > 0 and framed.fit == fit
    nose_photo = astronaut_keypoints[0]
    nose = to_image_coords(framed.keypoints, (SIZE, SIZE))[0]
    assert abs(nose[0] - nose_photo[0] * SIZE / astronaut.shape[1]) < 1
    assert fit.top * SIZE / fit.canvas_height < nose[1] < SIZE / 2


@pytest.fixture(scope="module")
def small_astronaut(astronaut):
    """A person who fills a small part of a photo: the portrait at 250x250, low on the left of a 1200x900 grey
    backdrop. (MediaPipe's detector misses some sizes of it, 300x300 for one; it finds this one.)"""
    rgb = np.full((900, 1200, 3), 128, dtype=np.uint8)
    rgb[590:840, 150:400] = np.asarray(Image.fromarray(astronaut).resize((250, 250), Image.BICUBIC))
    return rgb


def test_person_framing_crops_around_the_person(small_astronaut):
    """framing='person' (the default) crops the person's box with its margin, then frames that as fit_photo
    frames a photo; the person comes out large, where the whole photo leaves them small and off to a side."""
    person = frame_photo(small_astronaut, SIZE)
    detection = detect_person(small_astronaut)
    crop = person_crop(detection.box, *small_astronaut.shape[:2])
    assert 135 <= crop[0] and crop[2] <= 415 and 575 <= crop[1] and crop[3] <= 855  # around the portrait
    image, fit = fit_photo(small_astronaut, SIZE, crop)
    assert torch.equal(person.image, image) and person.fit == fit
    np.testing.assert_array_equal(person.keypoints, photo_keypoints_to_deepfashion(detection.keypoints, fit))
    whole = frame_photo(small_astronaut, SIZE, framing="whole")
    shoulders = lambda framed: np.ptp(to_image_coords(framed.keypoints, (SIZE, SIZE))[[2, 5], 0])
    assert shoulders(person) > 3 * shoulders(whole)
    nose = to_image_coords(person.keypoints, (SIZE, SIZE))[0]
    assert SIZE / 4 < nose[0] < 3 * SIZE / 4  # centred across


def test_mediapipe_stays_quiet(mediapipe_pose, astronaut, capfd):
    """Nothing of TensorFlow Lite, absl or protobuf reaches the process's stderr, nor stdout."""
    detect_person(astronaut)
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
