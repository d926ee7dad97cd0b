"""A procedurally rendered pose-transfer dataset, written in exactly the DeepFashion layout.

Each identity is a cartoon figure with its own build, skin, hair and clothes (a plain, striped or dotted
top with short or long sleeves, trousers or a skirt, shoes); each of its images poses it differently
(front, side or back view, full length or waist up) on a light background. The 18 COCO-18 keypoints come
from the same 2D kinematic skeleton that the figure is drawn on, and are written in the DeepFashion
convention (the 176x256 picture frame, x shifted by the 40 pixel border), with hidden joints missing:
the face in back views, the far eye and ear in side views, anything out of frame, and a few at random.
Pairs join images of one identity; train and test identities are disjoint. `make_synthetic` is
deterministic under its seed, and gives the same figures at every size.
"""

import colorsys
import math
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from data.deepfashion import pose_path
from data.errors import InputError, OutputExistsError
from data.lmdb import LMDBWriter
from data.pose import MISSING, NUM_JOINTS, RAW_HEIGHT, RAW_WIDTH, from_image_coords
from eval.images import flat_name, image_key

# DeepFashion's view numbers and names (img/.../01_1_front.jpg); a sixth pose starts a second outfit.
VIEWS = [(1, "front"), (2, "side"), (3, "back"), (4, "full"), (7, "additional")]

SKIN = [(255, 224, 196), (241, 194, 150), (224, 172, 125), (198, 134, 90), (141, 85, 50), (92, 58, 40)]
HAIR = [(25, 22, 20), (60, 40, 28), (105, 70, 40), (185, 150, 95), (150, 65, 35), (160, 160, 160)]

# Joint indices (data.pose order).
NOSE, NECK, R_EYE, L_EYE, R_EAR, L_EAR = 0, 1, 14, 15, 16, 17
HEAD = NUM_JOINTS  # an extra row of the joints while posing: the centre of the head
ARMS = {"R": (2, 3, 4), "L": (5, 6, 7)}
LEGS = {"R": (8, 9, 10), "L": (11, 12, 13)}


@dataclass
class Look:
    """What stays the same across an identity's images: the standing height in frame pixels, other
    lengths as fractions of the height, colours as RGB."""

    height: float
    shoulders: float
    hips: float
    limbs: float
    skin: tuple
    hair: tuple
    long_hair: bool
    top: tuple
    pattern: str
    pattern_colour: tuple
    pattern_period: float
    pattern_angle: float
    long_sleeves: bool
    skirt: bool
    skirt_length: float
    bottom: tuple
    shoes: tuple


@dataclass
class Shot:
    """One image of an identity: the joints in the 176x256 frame, which of them are annotated as
    missing, the view and the framing."""

    joints: np.ndarray
    hidden: np.ndarray
    head: np.ndarray
    facing: str
    height: float
    head_tilt: float
    background: tuple
    backdrop: str

    @property
    def ahead(self):
        """The image direction a profile faces: -1 left, 1 right; 0 for front and back views."""
        return {"left": -1, "right": 1}.get(self.facing, 0)


def _colour(rng, saturation=(0.35, 0.9), value=(0.3, 0.9)):
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*saturation), rng.uniform(*value))
    return tuple(round(255 * c) for c in rgb)


def _jitter(rng, colour, amount=12):
    return tuple(int(np.clip(c + rng.uniform(-amount, amount), 0, 255)) for c in colour)


def random_look(rng):
    """A random identity."""
    top = _colour(rng)
    contrast = (245, 245, 240) if sum(top) < 360 else (30, 30, 40)
    return Look(
        height=rng.uniform(0.86, 0.94) * RAW_HEIGHT,
        shoulders=rng.uniform(0.1, 0.13),
        hips=rng.uniform(0.055, 0.07),
        limbs=rng.uniform(0.9, 1.15),
        skin=_jitter(rng, SKIN[rng.integers(len(SKIN))]),
        hair=_jitter(rng, HAIR[rng.integers(len(HAIR))]),
        long_hair=bool(rng.random() < 0.45),
        top=top,
        pattern=str(rng.choice(["plain", "stripes", "dots"], p=[0.4, 0.35, 0.25])),
        pattern_colour=contrast if rng.random() < 0.6 else _colour(rng),
        pattern_period=rng.uniform(7, 13),
        pattern_angle=float(rng.choice([0.0, 0.0, 90.0, 45.0])),
        long_sleeves=bool(rng.random() < 0.5),
        skirt=bool(rng.random() < 0.35),
        skirt_length=rng.uniform(0.14, 0.3),
        bottom=_colour(rng, saturation=(0.2, 0.8), value=(0.2, 0.75)),
        shoes=_colour(rng, saturation=(0.0, 0.6), value=(0.08, 0.5)),
    )


def _arm_angles(rng):
    """(shoulder, elbow) angles in degrees for a front view: away from the body, and bent inwards."""
    kind = rng.choice(4, p=[0.55, 0.2, 0.15, 0.1])
    if kind == 0:  # hanging
        return rng.uniform(4, 22), rng.uniform(-5, 25)
    if kind == 1:  # bent: hand on the hip or in front of the body
        return rng.uniform(15, 45), rng.uniform(60, 125)
    if kind == 2:  # raised
        return rng.uniform(70, 165), rng.uniform(-40, 50)
    return rng.uniform(35, 80), rng.uniform(-30, 30)  # held out


def _limb(start, angle, length, side):
    """The end of a limb of `length` from `start` at `angle` degrees from straight down, towards `side`."""
    a = math.radians(angle)
    return start + length * np.array([side * math.sin(a), math.cos(a)])


def random_shot(rng, look, view):
    """A random pose of `look` for a DeepFashion view name."""
    facing = {"front": "front", "full": "front", "back": "back", "side": str(rng.choice(["left", "right"])),
              "additional": str(rng.choice(["front", "front", "left", "right"]))}[view]
    waist_up = view in ("front", "additional") and rng.random() < 0.35
    height = look.height * (rng.uniform(1.45, 1.75) if waist_up else rng.uniform(0.93, 1.0))
    # Posed in body heights around the mid-hip, y down; the last row is the centre of the head.
    joints = np.zeros((NUM_JOINTS + 1, 2))
    hidden = np.zeros(NUM_JOINTS, dtype=bool)
    joints[NECK] = 0, -0.335
    upper, fore, thigh, shin = 0.18, 0.15, 0.21, 0.215
    ahead = {"left": -1, "right": 1}.get(facing, 0)  # the image direction a side view faces
    if facing in ("front", "back"):
        right = -1 if facing == "front" else 1  # the image side of the person's right
        for name, side in (("R", right), ("L", -right)):
            shoulder, elbow, wrist = ARMS[name]
            joints[shoulder] = side * look.shoulders, -0.325
            lift, bend = _arm_angles(rng)
            joints[elbow] = _limb(joints[shoulder], lift, upper, side)
            joints[wrist] = _limb(joints[elbow], lift - bend, fore, side)
            hip, knee, ankle = LEGS[name]
            joints[hip] = side * look.hips, 0.0
            spread = rng.uniform(-2, 14)
            joints[knee] = _limb(joints[hip], spread, thigh, side)
            joints[ankle] = _limb(joints[knee], spread - rng.uniform(-6, 8), shin, side)
        joints[NOSE] = 0, -0.432
        joints[[R_EYE, L_EYE]] = (right * 0.021, -0.458), (-right * 0.021, -0.458)
        joints[[R_EAR, L_EAR]] = (right * 0.052, -0.45), (-right * 0.052, -0.45)
        hidden[[NOSE, R_EYE, L_EYE]] = facing == "back"
        hidden[[R_EAR, L_EAR]] |= rng.random(2) < (0.15 if facing == "front" else 0.05)
    else:
        near, far = ("L", "R") if facing == "left" else ("R", "L")
        stride = rng.uniform(0, 22)
        for name, depth, swing in ((near, 1, 1), (far, -1, -1)):
            shoulder, elbow, wrist = ARMS[name]
            joints[shoulder] = -ahead * depth * 0.012, -0.325
            lift = swing * rng.uniform(-10, 35) if rng.random() < 0.8 else rng.uniform(60, 120)
            joints[elbow] = _limb(joints[shoulder], lift, upper, ahead)
            joints[wrist] = _limb(joints[elbow], lift + rng.uniform(0, 95), fore, ahead)
            hip, knee, ankle = LEGS[name]
            joints[hip] = -ahead * depth * 0.01, 0.0
            joints[knee] = _limb(joints[hip], swing * stride, thigh, ahead)
            joints[ankle] = _limb(joints[knee], swing * stride - rng.uniform(0, 25), shin, ahead)
        joints[NOSE] = ahead * 0.062, -0.437
        near_eye, far_eye, near_ear, far_ear = (L_EYE, R_EYE, L_EAR, R_EAR) if near == "L" else \
            (R_EYE, L_EYE, R_EAR, L_EAR)
        joints[near_eye] = joints[far_eye] = ahead * 0.038, -0.458
        joints[near_ear] = joints[far_ear] = -ahead * 0.008, -0.45
        hidden[[far_eye, far_ear]] = True
    joints[HEAD] = joints[NECK] + (0.012 * ahead, -0.118)

    head_tilt = rng.uniform(-9, 9)
    face = [NOSE, R_EYE, L_EYE, R_EAR, L_EAR, HEAD]
    joints[face] = _rotate(joints[face], joints[NECK], head_tilt)
    pivot = np.array([0.0, 0.0 if waist_up else 0.43])
    joints = _rotate(joints, pivot, rng.uniform(-4, 4))
    top = rng.uniform(10, 20) if waist_up else rng.uniform(4, 14)
    joints = joints * height + np.array([RAW_WIDTH / 2 + rng.uniform(-10, 10), top + 0.52 * height])

    joints, head = joints[:NUM_JOINTS], joints[HEAD]
    outside = (joints < 0).any(axis=1) | (joints[:, 0] >= RAW_WIDTH) | (joints[:, 1] >= RAW_HEIGHT)
    dropped = rng.random(NUM_JOINTS) < 0.02
    dropped[[NOSE, NECK]] = False
    base = rng.uniform(228, 252)
    background = tuple(int(np.clip(base + rng.uniform(-7, 7), 0, 255)) for _ in range(3))
    backdrop = str(rng.choice(["plain", "gradient", "floor"], p=[0.5, 0.25, 0.25]))
    return Shot(joints, hidden | outside | dropped, head, facing, height, head_tilt, background, backdrop)


def _rotate(points, centre, degrees):
    a = math.radians(degrees)
    rotation = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return (points - centre) @ rotation.T + centre


class _Canvas:
    """Anti-aliased masks composited onto a float RGB image; coordinates in frame units."""

    def __init__(self, shape, scale, background):
        self.image = np.empty((*shape, 3), dtype=np.float32)
        self.image[:] = background
        self.scale = scale

    def point(self, p):
        return int(round(p[0] * self.scale * 16)), int(round(p[1] * self.scale * 16))

    def mask(self):
        return np.zeros(self.image.shape[:2], dtype=np.uint8)

    def line(self, mask, a, b, width):
        cv2.line(mask, self.point(a), self.point(b), 255, max(1, round(width * self.scale)), cv2.LINE_AA, 4)

    def ellipse(self, mask, centre, axes, angle=0.0):
        axes = (round(axes[0] * self.scale * 16), round(axes[1] * self.scale * 16))
        cv2.ellipse(mask, self.point(centre), axes, angle, 0, 360, 255, -1, cv2.LINE_AA, 4)

    def polygon(self, mask, points):
        cv2.fillPoly(mask, [np.array([self.point(p) for p in points], dtype=np.int32)], 255, cv2.LINE_AA, 4)

    def paint(self, mask, fill, shade=0.78):
        """Fill `mask` with a colour or an (H, W, 3) texture, its rim a little darker."""
        alpha = mask.astype(np.float32)[..., None] / 255
        inner = cv2.erode(mask, np.ones((3, 3), np.uint8)).astype(np.float32)[..., None] / 255
        fill = np.asarray(fill, dtype=np.float32) * (shade + (1 - shade) * inner)
        self.image += alpha * (fill - self.image)

    def pattern(self, look):
        """The top's fabric: plain, stripes or dots, fixed to the frame."""
        if look.pattern == "plain":
            return look.top
        rows, cols = self.image.shape[:2]
        y, x = np.mgrid[0:rows, 0:cols].astype(np.float32) / self.scale
        period = look.pattern_period
        if look.pattern == "stripes":
            a = math.radians(look.pattern_angle)
            on = (x * math.sin(a) + y * math.cos(a)) / period % 1 < 0.45
        else:
            row = np.floor(y / period)
            dx = (x + 0.5 * period * (row % 2)) % period - period / 2
            dy = y % period - period / 2
            on = dx * dx + dy * dy < (0.27 * period) ** 2
        return np.where(on[..., None], np.float32(look.pattern_colour), np.float32(look.top))


def render(look, shot, size):
    """The image of `shot` as a uint8 RGB (size, size, 3) array: the 176x256 frame stretched to a square
    as the DeepFashion LMDB images are (drawn at twice the resolution, then reduced)."""
    rows = 2 * size
    cols = round(rows * RAW_WIDTH / RAW_HEIGHT)
    canvas = _Canvas((rows, cols), rows / RAW_HEIGHT, shot.background)
    _backdrop(canvas, shot)
    side_view = shot.facing in ("left", "right")
    near = "L" if shot.facing == "left" else "R"
    if not side_view:
        _shadow(canvas, shot)
    if look.long_hair and shot.facing != "back":
        _long_hair(canvas, look, shot)
    fabric = canvas.pattern(look)
    behind = [side for side in ARMS if side_view and side != near]
    for side in behind:
        _arm(canvas, look, shot, side, fabric)
    _legs(canvas, look, shot)
    _torso(canvas, look, shot, fabric)
    if look.long_hair and shot.facing == "back":
        _long_hair(canvas, look, shot)
    for side in ARMS:
        if side not in behind:
            _arm(canvas, look, shot, side, fabric)
    _head(canvas, look, shot)
    small = cv2.resize(canvas.image, (size, size), interpolation=cv2.INTER_AREA)
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def _backdrop(canvas, shot):
    rows = canvas.image.shape[0]
    if shot.backdrop == "gradient":
        canvas.image *= np.linspace(1.0, 0.9, rows, dtype=np.float32)[:, None, None]
    elif shot.backdrop == "floor":
        floor = int(rows * 0.83)
        canvas.image[floor:] *= 0.9
        canvas.image[floor:floor + max(1, rows // 200)] *= 0.93


def _shadow(canvas, shot):
    h, j = shot.height, shot.joints
    mask = canvas.mask()
    canvas.ellipse(mask, (j[10] + j[13]) / 2 + (0, 0.035 * h), (0.17 * h, 0.022 * h))
    canvas.paint(mask, np.multiply(shot.background, 0.86), shade=1)


def _long_hair(canvas, look, shot):
    h = shot.height
    mask = canvas.mask()
    width = 0.07 if shot.ahead else 0.078
    canvas.ellipse(mask, shot.head + (-shot.ahead * 0.02 * h, 0.07 * h), (width * h, 0.13 * h), shot.head_tilt)
    canvas.paint(mask, look.hair)


def _legs(canvas, look, shot):
    """Legs (bare under a skirt), shoes, and the trousers or the skirt."""
    h, j, w = shot.height, shot.joints, look.limbs * shot.height
    mid_hip = (j[8] + j[11]) / 2
    legs, shoes = canvas.mask(), canvas.mask()
    for hip, knee, ankle in LEGS.values():
        canvas.line(legs, j[hip], j[knee], (0.07 if look.skirt else 0.085) * w)
        canvas.line(legs, j[knee], j[ankle], (0.055 if look.skirt else 0.068) * w)
        if shot.ahead:
            canvas.ellipse(shoes, j[ankle] + (shot.ahead * 0.035 * h, 0.022 * h), (0.05 * h, 0.022 * h))
        else:
            toe = math.copysign(0.01 * h, j[ankle][0] - mid_hip[0])
            canvas.ellipse(shoes, j[ankle] + (toe, 0.022 * h), (0.033 * h, 0.022 * h))
    half = (0.05 if shot.ahead else look.hips + 0.035) * h
    waist = [mid_hip + (-half, -0.05 * h), mid_hip + (half, -0.05 * h)]
    if look.skirt:
        canvas.paint(legs, look.skin)
        canvas.paint(shoes, look.shoes)
        flare = 0.065 * h if shot.ahead else 0.035 * h + 0.3 * abs(j[9][0] - j[12][0])
        hem = mid_hip[1] + look.skirt_length * h
        skirt = canvas.mask()
        canvas.polygon(skirt, waist + [(mid_hip[0] + half + flare, hem), (mid_hip[0] - half - flare, hem)])
        canvas.paint(skirt, look.bottom)
    else:
        canvas.polygon(legs, waist + [mid_hip + (half, 0.05 * h), mid_hip + (-half, 0.05 * h)])
        canvas.paint(legs, look.bottom)
        canvas.paint(shoes, look.shoes)


def _torso(canvas, look, shot, fabric):
    """The neck and the top's body."""
    h, j = shot.height, shot.joints
    neck = canvas.mask()
    canvas.line(neck, j[NECK], shot.head, 0.05 * look.limbs * h)
    canvas.paint(neck, look.skin)
    mid_hip = (j[8] + j[11]) / 2
    if shot.ahead:
        front, back = shot.ahead * 0.05 * h, -shot.ahead * 0.045 * h
        points = [j[NECK] + (front, -0.01 * h), mid_hip + (1.1 * front, 0.03 * h),
                  mid_hip + (1.1 * back, 0.03 * h), j[NECK] + (back, -0.01 * h)]
    else:
        left, right = sorted([j[2], j[5]], key=lambda p: p[0])
        hip_left, hip_right = sorted([j[8], j[11]], key=lambda p: p[0])
        points = [left + (-0.02 * h, -0.012 * h), right + (0.02 * h, -0.012 * h),
                  hip_right + (0.035 * h, 0.035 * h), hip_left + (-0.035 * h, 0.035 * h)]
    mask = canvas.mask()
    canvas.polygon(mask, points)
    for shoulder in (j[2], j[5]):
        canvas.ellipse(mask, shoulder + (0, 0.008 * h), (0.036 * h, 0.036 * h))
    canvas.paint(mask, fabric)


def _arm(canvas, look, shot, side, fabric):
    """One arm, bare, then its sleeve."""
    shoulder, elbow, wrist = (shot.joints[i] for i in ARMS[side])
    w = look.limbs * shot.height
    skin = canvas.mask()
    canvas.line(skin, shoulder, elbow, 0.062 * w)
    canvas.line(skin, elbow, wrist, 0.05 * w)
    canvas.ellipse(skin, wrist + 0.25 * (wrist - elbow), (0.028 * w, 0.028 * w))
    canvas.paint(skin, look.skin)
    sleeve = canvas.mask()
    if look.long_sleeves:
        canvas.line(sleeve, shoulder, elbow, 0.066 * w)
        canvas.line(sleeve, elbow, wrist, 0.056 * w)
    else:
        canvas.line(sleeve, shoulder, shoulder + 0.6 * (elbow - shoulder), 0.07 * w)
    canvas.paint(sleeve, fabric)


def _head(canvas, look, shot):
    """Hair, then the face (eyes, and a nose in profile), or the ears seen from the back."""
    h, j, tilt, ahead = shot.height, shot.joints, shot.head_tilt, shot.ahead
    hair = canvas.mask()
    canvas.ellipse(hair, shot.head + (-ahead * 0.012 * h, -0.006 * h), (0.06 * h, 0.07 * h), tilt)
    if shot.facing == "back":
        ears = canvas.mask()
        for ear in (j[R_EAR], j[L_EAR]):
            canvas.ellipse(ears, ear, (0.014 * h, 0.02 * h), tilt)
        canvas.paint(ears, look.skin)
        canvas.paint(hair, look.hair)
        return
    canvas.paint(hair, look.hair)
    face = canvas.mask()
    centre = shot.head + _rotate(np.array([[ahead * 0.012, 0.012]]), (0, 0), tilt)[0] * h
    canvas.ellipse(face, centre, (0.05 * h, 0.058 * h), tilt)
    if ahead:
        canvas.ellipse(face, j[NOSE], (0.012 * h, 0.01 * h))
    canvas.paint(face, look.skin)
    eyes = canvas.mask()
    for eye in (j[R_EYE], j[L_EYE]):
        canvas.ellipse(eyes, eye + (0, 0.006 * h), (0.006 * h, 0.008 * h))
    canvas.paint(eyes, (40, 30, 30), shade=1)


def keypoint_lines(shot):
    """The DeepFashion pose file of a shot: 18 lines "x y", integers, -1 -1 for a missing joint."""
    keypoints = from_image_coords(shot.joints, (RAW_HEIGHT, RAW_WIDTH))
    keypoints[shot.hidden] = MISSING
    return "".join(f"{x:.0f} {y:.0f}\n" for x, y in np.rint(keypoints))


def make_synthetic(root, num_identities=100, poses_per_identity=5, size=64, seed=0, test_fraction=0.1,
                   overwrite=False, progress=False):
    """Write a synthetic dataset under `root` in the DeepFashion layout; `size` is an int or a list.

    Each identity gets `poses_per_identity` images; `test_fraction` of the identities (at least one)
    form the test split. Train pairs list every other image of the identity as sources; test pairs one,
    the next image. Returns the number of images and of pairs per split.
    """
    sizes = [size] if isinstance(size, int) else list(size)
    if not sizes or any(not isinstance(s, int) or s < 16 for s in sizes):
        raise InputError(f"size must be an int >= 16 or a list of them, got {size!r}")
    if num_identities < 2 or poses_per_identity < 2:
        raise InputError(f"need at least 2 identities and 2 poses per identity, got {num_identities} "
                         f"and {poses_per_identity}")
    if not 0 < test_fraction < 1:
        raise InputError(f"test_fraction must be in (0, 1), got {test_fraction}")
    root = Path(root)
    if (root / "train_pairs.txt").exists() and not overwrite:
        raise OutputExistsError(f"{root} already holds a dataset (pass overwrite=True / --overwrite)")
    shutil.rmtree(root / "pose" / "SYNTH", ignore_errors=True)
    *identity_seeds, split_seed = np.random.SeedSequence(seed).spawn(num_identities + 1)
    num_test = min(num_identities - 1, max(1, round(test_fraction * num_identities)))
    test_ids = set(np.random.default_rng(split_seed).choice(num_identities, num_test, replace=False).tolist())
    splits = {"train": [], "test": []}
    with ExitStack() as stack:
        writers = [stack.enter_context(LMDBWriter(root / f"{s}-{s}", overwrite=overwrite)) for s in sizes]
        for identity in tqdm(range(num_identities), desc="identities", disable=not progress):
            rng = np.random.default_rng(identity_seeds[identity])
            look = random_look(rng)
            paths = []
            for pose in range(poses_per_identity):
                number, view = VIEWS[pose % len(VIEWS)]
                path = f"img/SYNTH/Figures/id_{identity:08d}/{pose // len(VIEWS) + 1:02d}_{number}_{view}.jpg"
                shot = random_shot(rng, look, view)
                keypoint_file = pose_path(root, path)
                keypoint_file.parent.mkdir(parents=True, exist_ok=True)
                keypoint_file.write_text(keypoint_lines(shot))
                for writer, s in zip(writers, sizes):
                    _, png = cv2.imencode(".png", render(look, shot, s)[:, :, ::-1])
                    writer.put(image_key(path), png.tobytes())
                paths.append(path)
            splits["test" if identity in test_ids else "train"].append(paths)
    counts = {}
    for split, identities in splits.items():
        if split == "train":
            lines = [",".join([t, *(s for s in paths if s != t)]) for paths in identities for t in paths]
        else:
            lines = [f"{t},{paths[(i + 1) % len(paths)]}" for paths in identities for i, t in enumerate(paths)]
        names = [flat_name(p) + ".jpg" for paths in identities for p in paths]
        (root / f"{split}_pairs.txt").write_text("".join(line + "\n" for line in lines))
        (root / f"{split}.lst").write_text("".join(name + "\n" for name in names))
        counts[f"{split}_images"], counts[f"{split}_pairs"] = len(names), len(lines)
    return counts
