"""Pose keypoints: loading, the DeepFashion coordinate convention, skeleton rendering.

Keypoints are 18 OpenPose COCO-18 joints, an (18, 2) array of (x, y) with (-1, -1) for a missing joint:
0 nose, 1 neck, 2-4 right shoulder/elbow/wrist, 5-7 left shoulder/elbow/wrist, 8-10 right hip/knee/ankle,
11-13 left hip/knee/ankle, 14/15 right/left eye, 16/17 right/left ear.

DeepFashion pose files give them on the 256x256 frame of the low-resolution In-shop images, whose 176
pixel wide picture sits between 40 pixel white borders; `to_image_coords` maps them onto an (H, W) image
of the picture alone, such as the LMDB images.
"""

import json
import math
from pathlib import Path

import cv2
import numpy as np
import torch

from data.errors import InputError, MissingEntryError, MissingFileError

NUM_JOINTS = 18
MISSING = -1.0

# The first 17 limbs of OpenPose's COCO-18 list (its last two, ear-shoulder, are never drawn).
LIMBS = [(1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
         (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17)]

# OpenPose palette, one colour per joint and per limb, in the BGR order the released code draws with.
PALETTE_BGR = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
               (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
               (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85)]

# Index of each joint's mirror image (left <-> right); the nose and neck map to themselves.
FLIP_JOINTS = [0, 1, 5, 6, 7, 2, 3, 4, 11, 12, 13, 8, 9, 10, 15, 14, 17, 16]

# COCO-18 joint i is BODY_25 joint BODY25_TO_COCO18[i] (BODY_25 adds the mid-hip, 8, and six foot joints).
BODY25_TO_COCO18 = [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]

RAW_BORDER = 40.0
RAW_WIDTH = 176.0
RAW_HEIGHT = 256.0



def load_keypoints(path, min_confidence=0.1):
    """Read 18 keypoints as a float32 (18, 2) array with (-1, -1) for a missing joint, in the DeepFashion
    convention of `to_image_coords` (the frame of DeepFashion's 256x256 low-resolution images: the 176-pixel
    wide picture between 40-pixel borders), whatever the format.

    `.json`: OpenPose's format; the first person's `pose_keypoints_2d`, COCO-18 (54 values) or BODY_25
    (75 values, converted to COCO-18); joints with confidence below `min_confidence` are missing.
    Anything else: a DeepFashion pose file, 18 lines "x y"; a joint with either coordinate -1 is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"keypoint file not found: {path}")
    if path.suffix.lower() == ".json":
        return _load_openpose_json(path, min_confidence)
    return _load_deepfashion_txt(path)


def _load_deepfashion_txt(path):
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    if len(lines) != NUM_JOINTS:
        raise InputError(f"{path}: expected {NUM_JOINTS} lines 'x y', got {len(lines)}")
    keypoints = np.empty((NUM_JOINTS, 2), dtype=np.float32)
    for joint, (n, line) in enumerate(lines):
        try:
            x, y = (float(v) for v in line.split())
        except ValueError:
            raise InputError(f"{path}: line {n} must be two numbers 'x y', got {line.strip()!r}") from None
        keypoints[joint] = x, y
    if not np.isfinite(keypoints).all():
        raise InputError(f"{path}: keypoints must be finite numbers, got NaN or inf")
    keypoints[(keypoints == MISSING).any(axis=1)] = MISSING
    return keypoints


def _load_openpose_json(path, min_confidence):
    try:
        people = json.loads(path.read_text())["people"]
        values = people[0]["pose_keypoints_2d"]
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    except (KeyError, IndexError, TypeError):
        raise MissingEntryError(f"{path}: expected OpenPose JSON with people[0].pose_keypoints_2d") from None
    try:
        values = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{path}: pose_keypoints_2d must be a list of numbers") from None
    if values.shape == (25 * 3,):
        joints = values.reshape(25, 3)[BODY25_TO_COCO18]
    elif values.shape == (NUM_JOINTS * 3,):
        joints = values.reshape(NUM_JOINTS, 3)
    else:
        raise InputError(f"{path}: pose_keypoints_2d must hold 54 (COCO-18) or 75 (BODY_25) values, "
                         f"got {values.size}")
    if not np.isfinite(joints).all():
        raise InputError(f"{path}: keypoints must be finite numbers, got NaN or inf")
    keypoints = joints[:, :2].astype(np.float32)
    keypoints[joints[:, 2] < min_confidence] = MISSING
    return keypoints


def visible_joints(keypoints):
    """How many of the 18 joints are present (neither coordinate is -1)."""
    return int((np.asarray(keypoints) != MISSING).all(axis=1).sum())


def require_joints(keypoints, name, minimum, where=""):
    """ValueError naming `name` unless at least `minimum` joints are present."""
    found = visible_joints(keypoints)
    if found < minimum:
        raise InputError(f"{name}: only {found} of {NUM_JOINTS} joints found{' ' + where if where else ''}; "
                         f"a pose needs at least {minimum}")


def save_openpose_json(keypoints, path):
    """Write keypoints (18, 2) as OpenPose COCO-18 JSON (x, y, confidence: 1 for a joint, 0 0 0 when missing),
    the format `load_keypoints` reads back."""
    values = []
    for x, y in np.asarray(keypoints, dtype=np.float64):
        values += [0.0, 0.0, 0.0] if MISSING in (x, y) else [float(x), float(y), 1.0]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"version": 1.3, "people": [{"pose_keypoints_2d": values}]}))


def _check_keypoints(keypoints):
    keypoints = np.asarray(keypoints, dtype=np.float64)
    if keypoints.shape != (NUM_JOINTS, 2):
        raise ValueError(f"keypoints must have shape ({NUM_JOINTS}, 2), got {keypoints.shape}")
    return keypoints


def to_image_coords(keypoints, size):
    """Map DeepFashion keypoints onto an image of `size` (H, W): x -> (x - 40) W / 176, y -> y H / 256.

    Missing joints stay (-1, -1). Float64, like the released numpy code, so that rounding in
    `draw_skeleton` matches it.
    """
    keypoints = _check_keypoints(keypoints)
    height, width = size
    missing = (keypoints == MISSING).any(axis=1)
    out = np.empty_like(keypoints)
    out[:, 0] = (keypoints[:, 0] - RAW_BORDER) * (width / RAW_WIDTH)
    out[:, 1] = keypoints[:, 1] * (height / RAW_HEIGHT)
    out[missing] = MISSING
    return out


def from_image_coords(keypoints, size):
    """Inverse of `to_image_coords`: image keypoints of an (H, W) image to the DeepFashion convention."""
    keypoints = _check_keypoints(keypoints)
    height, width = size
    missing = (keypoints == MISSING).any(axis=1)
    out = np.empty_like(keypoints)
    out[:, 0] = keypoints[:, 0] * (RAW_WIDTH / width) + RAW_BORDER
    out[:, 1] = keypoints[:, 1] * (RAW_HEIGHT / height)
    out[missing] = MISSING
    return out


def draw_skeleton(keypoints, size):
    """Render image keypoints as the released pipeline does: a float tensor (3, H, W) in [0, 1].

    On a black uint8 canvas: a filled circle of radius 4 per joint, then each limb as a filled ellipse
    of half-width 4 blended over the canvas (0.4 canvas + 0.6 limb); then divided by its maximum.
    A joint is missing when a coordinate is -1. With no joint at all the canvas stays black (zeros,
    where the released code would divide by zero).
    """
    keypoints = _check_keypoints(keypoints)
    height, width = size
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    present = ~(keypoints == MISSING).any(axis=1)
    for joint in np.flatnonzero(present):
        x, y = keypoints[joint]
        cv2.circle(canvas, (int(x), int(y)), 4, PALETTE_BGR[joint], thickness=-1)
    for limb, (a, b) in enumerate(LIMBS):
        if not (present[a] and present[b]):
            continue
        (xa, ya), (xb, yb) = keypoints[a], keypoints[b]
        center = (int((xa + xb) / 2), int((ya + yb) / 2))
        half_length = int(((xa - xb) ** 2 + (ya - yb) ** 2) ** 0.5 / 2)  # as released (not hypot)
        angle = int(math.degrees(math.atan2(ya - yb, xa - xb)))
        polygon = cv2.ellipse2Poly(center, (half_length, 4), angle, 0, 360, 1)
        limb_canvas = canvas.copy()
        cv2.fillConvexPoly(limb_canvas, polygon, PALETTE_BGR[limb])
        canvas = cv2.addWeighted(canvas, 0.4, limb_canvas, 0.6, 0)
    skeleton = torch.from_numpy(np.ascontiguousarray(canvas[:, :, ::-1])).permute(2, 0, 1).float() / 255
    peak = skeleton.max()
    return skeleton / peak if peak > 0 else skeleton


def overlay(image, skeleton):
    """A skeleton (3, H, W) in [0, 1] drawn over an image (3, H, W) in [-1, 1]: its coloured pixels replace the
    image's. -> (3, H, W) in [-1, 1]."""
    return torch.where(skeleton.amax(0, keepdim=True) > 0, skeleton * 2 - 1, image)
