"""Your own photos as model inputs: reading, fitting to the DeepFashion frame, keypoints from MediaPipe Pose.

DeepFashion In-shop pictures are 176x256 (W x H) people on white, and the training images are those
pictures resized straight to S x S with PIL bicubic (a horizontal stretch, see data/deepfashion.py).
`fit_photo` does the same to a photo: it pads it with white to the 176:256 aspect, centred, then resizes
the padded picture to S x S, so that it looks like a training image.

Photo keypoints are pixel coordinates, (0, 0) being the centre of the top-left pixel, as OpenPose gives
them; `photo_keypoints_to_deepfashion` maps them through the padding and the resize into the DeepFashion
convention of data.pose, so that `to_image_coords(keypoints, (S, S))` places them on the fitted image.

Detection uses MediaPipe Pose, an optional extra (requirements-photo.txt): the model it runs,
pose_landmark_full, ships in the mediapipe 0.10.14 wheel, so it works offline. Later releases keep only the
Tasks API, whose model files are downloaded separately.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from data.deepfashion import to_tensor
from data.pose import MISSING, NUM_JOINTS, RAW_HEIGHT, RAW_WIDTH, from_image_coords

WHITE = (255, 255, 255)
INSTALL_HINT = "pip install mediapipe==0.10.14 protobuf==4.25.9 (see requirements-photo.txt)"

# COCO-18 joint i is MediaPipe Pose landmark MEDIAPIPE_TO_COCO18[i]; the neck (None) is the midpoint of
# the shoulders. MediaPipe's left/right are the person's, like OpenPose's.
MEDIAPIPE_TO_COCO18 = [0, None, 12, 14, 16, 11, 13, 15, 24, 26, 28, 23, 25, 27, 5, 2, 8, 7]
NUM_LANDMARKS = 33
NECK, RIGHT_SHOULDER, LEFT_SHOULDER = 1, 2, 5


@dataclass(frozen=True)
class PhotoFit:
    """How `fit_photo` placed a photo: pasted at (left, top) on a white canvas of canvas_width x
    canvas_height pixels (the 176:256 aspect), which was then resized to size x size."""
    left: int
    top: int
    canvas_width: int
    canvas_height: int
    size: int


def read_photo(path):
    """A photo file as an RGB uint8 array (H, W, 3), upright (EXIF rotation applied), transparency on white."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"photo not found: {path}")
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.has_transparency_data:
                rgba = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba)
            return np.array(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read photo {path}: {e}") from None


def _check_rgb(rgb):
    if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
            and rgb.size > 0):
        described = f"{rgb.dtype} {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise ValueError(f"expected a non-empty RGB uint8 array (H, W, 3), got {described}")


def _plan_fit(height, width, size):
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}")
    aspect = RAW_WIDTH / RAW_HEIGHT
    canvas_width = max(width, round(height * aspect))
    canvas_height = max(height, round(width / aspect))
    return PhotoFit(left=(canvas_width - width) // 2, top=(canvas_height - height) // 2,
                    canvas_width=canvas_width, canvas_height=canvas_height, size=size)


def fit_photo(rgb, size=256):
    """The photo as a float (3, size, size) tensor in [-1, 1] framed like a DeepFashion training image, and
    the `PhotoFit` that maps its keypoints: white padding to the 176:256 aspect (centred), then a resize to
    size x size with PIL bicubic, as the training LMDBs were made."""
    _check_rgb(rgb)
    fit = _plan_fit(*rgb.shape[:2], size)
    canvas = Image.new("RGB", (fit.canvas_width, fit.canvas_height), WHITE)
    canvas.paste(Image.fromarray(rgb), (fit.left, fit.top))
    return to_tensor(canvas.resize((size, size), Image.BICUBIC)), fit


def photo_keypoints_to_deepfashion(keypoints, fit):
    """Keypoints (18, 2) in photo pixels to the DeepFashion convention of the photo fitted by `fit`.

    Missing joints ((-1, -1), or any coordinate -1) stay missing. Float32, like `load_keypoints`.
    """
    keypoints = np.asarray(keypoints, dtype=np.float64)
    if keypoints.shape != (NUM_JOINTS, 2):
        raise ValueError(f"keypoints must have shape ({NUM_JOINTS}, 2), got {keypoints.shape}")
    missing = (keypoints == MISSING).any(axis=1)
    # Pixel centres follow the resize: centre u of the canvas goes to (u + 0.5) * scale - 0.5.
    fitted = np.empty_like(keypoints)
    fitted[:, 0] = (keypoints[:, 0] + fit.left + 0.5) * (fit.size / fit.canvas_width) - 0.5
    fitted[:, 1] = (keypoints[:, 1] + fit.top + 0.5) * (fit.size / fit.canvas_height) - 0.5
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


def _pose_solution():
    """MediaPipe's Pose solution module; an ImportError that says what to install when it is not usable."""
    try:
        import mediapipe
        from google import protobuf
    except ImportError as e:
        raise ImportError(f"detecting keypoints on photos needs MediaPipe ({e}): {INSTALL_HINT}") from e
    if not hasattr(mediapipe, "solutions") or int(protobuf.__version__.split(".")[0]) >= 5:
        raise ImportError(f"found mediapipe {mediapipe.__version__} with protobuf {protobuf.__version__}; "
                          f"the Pose solution needs mediapipe 0.10.14 with protobuf<5: {INSTALL_HINT}")
    return mediapipe.solutions.pose


def _detect_landmarks(rgb):
    """MediaPipe Pose's landmarks (33, 3) (normalised x, y, visibility) of the most prominent person in the
    photo, or None when it finds no one. Runs the full model, the one the wheel ships."""
    pose = _pose_solution()
    with pose.Pose(static_image_mode=True, model_complexity=1) as detector:
        result = detector.process(np.ascontiguousarray(rgb))
    if result.pose_landmarks is None:
        return None
    return np.array([(p.x, p.y, p.visibility) for p in result.pose_landmarks.landmark])


def detect_keypoints(rgb, name="photo", min_visibility=0.5, min_joints=4):
    """COCO-18 keypoints (18, 2) float32 of the person in an RGB uint8 photo, in its pixels, -1 for missing.

    Raises a ValueError naming the photo (`name`) when MediaPipe finds no person, or fewer than
    `min_joints` of the 18 joints at `min_visibility` or above inside the photo.
    """
    _check_rgb(rgb)
    landmarks = _detect_landmarks(rgb)
    if landmarks is None:
        raise ValueError(f"{name}: no person found by MediaPipe Pose")
    keypoints = coco18_from_mediapipe(landmarks, rgb.shape[:2], min_visibility)
    found = int((keypoints != MISSING).all(axis=1).sum())
    if found < min_joints:
        raise ValueError(f"{name}: only {found} of {NUM_JOINTS} joints found with visibility >= "
                         f"{min_visibility} inside the photo, fewer than the {min_joints} needed")
    return keypoints


def keypoints_from_photo(path, size=256, min_visibility=0.5, min_joints=4):
    """The keypoints of the person in a photo file, in the DeepFashion convention of the photo as
    `fit_photo(read_photo(path), size)` frames it."""
    rgb = read_photo(path)
    keypoints = detect_keypoints(rgb, name=str(path), min_visibility=min_visibility, min_joints=min_joints)
    return photo_keypoints_to_deepfashion(keypoints, _plan_fit(*rgb.shape[:2], size))
