"""Your own photos as model inputs: reading, finding the person, framing them as DeepFashion frames a figure.

DeepFashion In-shop pictures are 176x256 (W x H), one full figure on white, and the training images are those
pictures resized straight to S x S with PIL bicubic (a horizontal stretch, see data/deepfashion.py).
`frame_photo` makes a photo look the same: by default it crops around the person MediaPipe finds, with a
margin of 5% of their height on every side (clipped to the photo), then pads the crop with white to the
176:256 aspect, centred, and resizes it to S x S. framing="whole" pads and resizes the whole photo instead.

Photo keypoints are pixel coordinates, (0, 0) being the centre of the top-left pixel, as OpenPose gives
them; `photo_keypoints_to_deepfashion` maps them through the crop, the padding and the resize into the
DeepFashion convention of data.pose, so that `to_image_coords(keypoints, (S, S))` places them on the framed
image.

Detection uses MediaPipe Pose, an optional extra (requirements-photo.txt): the model it runs,
pose_landmark_full, ships in the mediapipe 0.10.14 wheel, so it works offline. Later releases keep only the
Tasks API, whose model files are downloaded separately. Its C++ logging (TensorFlow Lite, absl) and
protobuf's warnings are kept off the console.
"""

import os
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from data.errors import InputError, MissingFileError, MissingPackageError
from data.images import to_tensor
from data.pose import MISSING, NUM_JOINTS, RAW_HEIGHT, RAW_WIDTH, from_image_coords, require_joints

WHITE = (255, 255, 255)
INSTALL_HINT = "pip install mediapipe==0.10.14 protobuf==4.25.9 (see requirements-photo.txt)"

# COCO-18 joint i is MediaPipe Pose landmark MEDIAPIPE_TO_COCO18[i]; the neck (None) is the midpoint of
# the shoulders. MediaPipe's left/right are the person's, like OpenPose's.
MEDIAPIPE_TO_COCO18 = [0, None, 12, 14, 16, 11, 13, 15, 24, 26, 28, 23, 25, 27, 5, 2, 8, 7]
NUM_LANDMARKS = 33
NECK, RIGHT_SHOULDER, LEFT_SHOULDER = 1, 2, 5
MARGIN = 0.05  # person framing: the margin around the person, as a share of their height
FRAMINGS = ("person", "whole")


@dataclass(frozen=True)
class PhotoFit:
    """How `fit_photo` framed a photo: its region `crop` (left, top, right, bottom) was pasted at (left, top)
    on a white canvas of canvas_width x canvas_height pixels (the 176:256 aspect), then resized to size x size."""
    left: int
    top: int
    canvas_width: int
    canvas_height: int
    size: int
    crop: tuple


@dataclass(frozen=True)
class Detection:
    """The person MediaPipe found in a photo: COCO-18 keypoints (18, 2) in its pixels (-1 for missing) and
    the box (left, top, right, bottom; right and bottom exclusive) of their segmentation mask and keypoints."""
    keypoints: np.ndarray
    box: tuple


@dataclass(frozen=True)
class FramedPhoto:
    """A photo as a model input: `image` (3, S, S) in [-1, 1], the person's `keypoints` (18, 2) in the
    DeepFashion convention of that image, and how it was framed (`fit`; None for a dataset picture, which is
    resized straight to S x S)."""
    image: torch.Tensor
    keypoints: np.ndarray
    fit: PhotoFit | None


def read_photo(path):
    """A photo file as an RGB uint8 array (H, W, 3), upright (EXIF rotation applied), transparency on white."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"photo not found: {path}")
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.has_transparency_data:
                rgba = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba)
            return np.array(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"cannot read photo {path}: {e}") from None


def _check_rgb(rgb):
    if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
            and rgb.size > 0):
        described = f"{rgb.dtype} {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise ValueError(f"expected a non-empty RGB uint8 array (H, W, 3), got {described}")


def _plan_fit(crop, size):
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}")
    width, height = crop[2] - crop[0], crop[3] - crop[1]
    aspect = RAW_WIDTH / RAW_HEIGHT
    canvas_width = max(width, round(height * aspect))
    canvas_height = max(height, round(width / aspect))
    return PhotoFit(left=(canvas_width - width) // 2, top=(canvas_height - height) // 2,
                    canvas_width=canvas_width, canvas_height=canvas_height, size=size, crop=tuple(crop))


def person_crop(box, height, width, margin=MARGIN):
    """The region (left, top, right, bottom) around a person's box, with `margin` of their height on every
    side, clipped to a height x width photo."""
    left, top, right, bottom = box
    pad = round(margin * (bottom - top))
    return max(0, left - pad), max(0, top - pad), min(width, right + pad), min(height, bottom + pad)


def fit_photo(rgb, size=256, crop=None):
    """The photo, or its region `crop` (left, top, right, bottom), as a float (3, size, size) tensor in [-1, 1]
    framed like a DeepFashion training image, and the `PhotoFit` that maps its keypoints: white padding to the
    176:256 aspect (centred), then a resize to size x size with PIL bicubic, as the training LMDBs were made."""
    _check_rgb(rgb)
    left, top, right, bottom = crop or (0, 0, rgb.shape[1], rgb.shape[0])
    region = rgb[top:bottom, left:right]
    if region.size == 0:
        raise InputError(f"crop {crop} is empty for a photo of {rgb.shape[1]}x{rgb.shape[0]}")
    fit = _plan_fit((left, top, right, bottom), size)
    canvas = Image.new("RGB", (fit.canvas_width, fit.canvas_height), WHITE)
    canvas.paste(Image.fromarray(np.ascontiguousarray(region)), (fit.left, fit.top))
    return to_tensor(canvas.resize((size, size), Image.BICUBIC)), fit


def photo_keypoints_to_deepfashion(keypoints, fit):
    """Keypoints (18, 2) in photo pixels to the DeepFashion convention of the photo framed by `fit`.

    Missing joints ((-1, -1), or any coordinate -1) stay missing. Float32, like `load_keypoints`.
    """
    keypoints = np.asarray(keypoints, dtype=np.float64)
    if keypoints.shape != (NUM_JOINTS, 2):
        raise ValueError(f"keypoints must have shape ({NUM_JOINTS}, 2), got {keypoints.shape}")
    missing = (keypoints == MISSING).any(axis=1)
    # Pixel centres follow the resize: centre u of the canvas goes to (u + 0.5) * scale - 0.5.
    fitted = np.empty_like(keypoints)
    fitted[:, 0] = (keypoints[:, 0] - fit.crop[0] + fit.left + 0.5) * (fit.size / fit.canvas_width) - 0.5
    fitted[:, 1] = (keypoints[:, 1] - fit.crop[1] + fit.top + 0.5) * (fit.size / fit.canvas_height) - 0.5
    fitted[missing] = MISSING
    return from_image_coords(fitted, (fit.size, fit.size)).astype(np.float32)


def coco18_from_mediapipe(landmarks, image_size, min_visibility=0.5):
    """MediaPipe Pose's 33 landmarks as COCO-18 keypoints (18, 2) float32 in pixels, -1 for missing.

    `landmarks` (33, 3): normalised x, y (0..1 across the image) and visibility, as MediaPipe gives them;
    `image_size` (H, W). A landmark below `min_visibility` or outside the image is missing; the neck is the
    midpoint of the shoulders, missing unless both are present.
    """
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape != (NUM_LANDMARKS, 3):
        raise ValueError(f"landmarks must have shape ({NUM_LANDMARKS}, 3), got {landmarks.shape}")
    height, width = image_size
    x, y, visibility = landmarks.T
    present = (visibility >= min_visibility) & (x >= 0) & (x <= 1) & (y >= 0) & (y <= 1)
    pixels = np.stack([x * width - 0.5, y * height - 0.5], axis=1)
    keypoints = np.full((NUM_JOINTS, 2), MISSING, dtype=np.float32)
    for joint, landmark in enumerate(MEDIAPIPE_TO_COCO18):
        if landmark is not None and present[landmark]:
            keypoints[joint] = pixels[landmark]
    if (keypoints[[RIGHT_SHOULDER, LEFT_SHOULDER]] != MISSING).all():
        keypoints[NECK] = (keypoints[RIGHT_SHOULDER] + keypoints[LEFT_SHOULDER]) / 2
    return keypoints


@contextmanager
def quiet():
    """Keep MediaPipe quiet: its C++ (TensorFlow Lite, absl) writes to the process's stderr, which goes to
    /dev/null meanwhile, and protobuf's deprecation warnings are ignored."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module="google.protobuf")
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _pose_solution():
    """MediaPipe's Pose solution module; an ImportError that says what to install when it is not usable."""
    try:
        with quiet():
            import mediapipe
            from google import protobuf
    except ImportError as e:
        raise MissingPackageError(f"finding the person in a photo needs MediaPipe ({e}): {INSTALL_HINT}") from e
    if not hasattr(mediapipe, "solutions") or int(protobuf.__version__.split(".")[0]) >= 5:
        raise MissingPackageError(f"found mediapipe {mediapipe.__version__} with protobuf {protobuf.__version__}; "
                          f"the Pose solution needs mediapipe 0.10.14 with protobuf<5: {INSTALL_HINT}")
    return mediapipe.solutions.pose


def _detect(rgb):
    """MediaPipe Pose on a photo: (landmarks (33, 3) of normalised x, y and visibility, segmentation mask
    (H, W) in [0, 1]) of the most prominent person, or None when it finds no one. Runs the full model, the one
    the wheel ships."""
    pose = _pose_solution()
    with quiet(), pose.Pose(static_image_mode=True, model_complexity=1, enable_segmentation=True) as detector:
        result = detector.process(np.ascontiguousarray(rgb))
    if result.pose_landmarks is None:
        return None
    landmarks = np.array([(p.x, p.y, p.visibility) for p in result.pose_landmarks.landmark])
    return landmarks, result.segmentation_mask


def detect_person(rgb, name="photo", min_visibility=0.5, min_joints=0):
    """The `Detection` of the person in an RGB uint8 photo. Raises a ValueError naming the photo (`name`) when
    MediaPipe finds no person, or fewer than `min_joints` of the 18 joints at `min_visibility` or above inside
    the photo."""
    _check_rgb(rgb)
    no_person = InputError(f"{name}: no person found (MediaPipe Pose); the photo must show a person")
    found = _detect(rgb)
    if found is None:
        raise no_person
    landmarks, mask = found
    keypoints = coco18_from_mediapipe(landmarks, rgb.shape[:2], min_visibility)
    require_joints(keypoints, name, min_joints, f"with visibility >= {min_visibility} inside the photo")
    ys, xs = np.nonzero(mask > 0.5) if mask is not None else (np.zeros(0), np.zeros(0))
    present = keypoints[(keypoints != MISSING).all(axis=1)]
    xs, ys = np.concatenate([xs, present[:, 0]]), np.concatenate([ys, present[:, 1]])
    if xs.size == 0:  # landmarks, but none visible and no pixel of the mask: nobody to frame
        raise no_person
    box = (int(np.floor(xs.min())), int(np.floor(ys.min())), int(np.ceil(xs.max())) + 1, int(np.ceil(ys.max())) + 1)
    return Detection(keypoints, box)


def dataset_photo(rgb, keypoints, size=256):
    """A picture of a dataset (DeepFashion's, or the synthetic set's), framed as the dataset frames its images
    already, with its known keypoints (DeepFashion convention): resized straight to size x size with PIL bicubic,
    as the LMDBs were made (the image itself at that size), with nothing to detect."""
    _check_rgb(rgb)
    image = Image.fromarray(rgb)
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return FramedPhoto(to_tensor(image), np.asarray(keypoints, np.float32), None)


def frame_photo(rgb, size=256, name="photo", framing="person", min_joints=0, min_visibility=0.5):
    """A `FramedPhoto` of the person in an RGB uint8 photo: framed around them ("person") or the whole photo
    ("whole"), with their keypoints. The photo must show a person with at least `min_joints` joints."""
    if framing not in FRAMINGS:
        raise InputError(f"framing must be one of {FRAMINGS}, got {framing!r}")
    detection = detect_person(rgb, name, min_visibility, min_joints)
    crop = person_crop(detection.box, *rgb.shape[:2]) if framing == "person" else None
    image, fit = fit_photo(rgb, size, crop)
    return FramedPhoto(image, photo_keypoints_to_deepfashion(detection.keypoints, fit), fit)
