"""DeepFashion In-shop pairs on disk, as prepared for PIDM (and used by the released X-MDPT code).

Layout under `root`:
    train_pairs.txt, test_pairs.txt   lines "target,source1[,source2...]" of image paths (img/.../x.jpg)
    train.lst, test.lst               the images of each split as flat names (`flat_name` + ".jpg")
    pose/<path without img/>.txt      18 lines "x y" (data.pose convention); img/A/B.jpg -> pose/A/B.txt
    {S}-{S}/                          LMDB: key `image_key(path)` (path with .png, utf-8), value PNG bytes

PIDM's preparation resizes each `img_highres` picture (750x1101, the 176x256 aspect) straight to SxS with
PIL bicubic: a horizontal stretch, no padding or cropping. The keypoints, annotated on the 256x256
low-resolution pictures (176 wide plus 40 pixel white borders), map onto it with `to_image_coords`.
"""

import io
from contextlib import ExitStack
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from tqdm import tqdm

from data.errors import InputError, MissingFileError
from data.images import to_tensor
from data.lmdb import LMDBReader, LMDBWriter
from data.pose import FLIP_JOINTS, MISSING, draw_skeleton, load_keypoints, to_image_coords
from eval.images import image_key, pair_name


def pose_path(root, image_path):
    """The keypoint file of an image path, as in the released code: img/A/B.jpg -> {root}/pose/A/B.txt."""
    return Path(root) / "pose" / Path(image_path.removeprefix("img/")).with_suffix(".txt")


def read_pairs(path):
    """The (target, [sources]) pairs of a pair file."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(
            f"pair file not found: {path}. Put DeepFashion in {path.parent} as PIDM prepared it (README: Weights "
            f"and data), then make its LMDBs with python -m scripts.prepare_deepfashion --root {path.parent}; "
            f"or make a synthetic set of that layout there with python -m scripts.make_synthetic --root {path.parent}")
    pairs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        names = [name.strip() for name in line.split(",")]
        if len(names) < 2 or not all(names):
            raise InputError(f"{path}:{n}: expected 'target,source1[,source2...]', got {line!r}")
        pairs.append((names[0], names[1:]))
    if not pairs:
        raise InputError(f"{path}: no pairs")
    return pairs


def decode_image(data, name, size=None):
    """Encoded image bytes as a PIL RGB image, checked to be size x size when `size` is given; errors name
    `name` (e.g. the LMDB and key)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"{name} is not a readable image ({e})") from None
    if size is not None and image.size != (size, size):
        raise InputError(f"{name} is {image.size[0]}x{image.size[1]}, expected {size}x{size}")
    return image.convert("RGB")


class PairDataset(Dataset):
    """Source/target pairs with the target's skeleton and the DINOv2 inputs.

    Test mode (`augment=False`) is deterministic: the first listed source, no augmentation. Training
    mode picks a source at random, swaps source and target with p = 0.5, flips both images with p = 0.5,
    and scales each image by up to `scale_jitter` (bicubic) and crops it back at a random offset, the
    target's keypoints following its image. Each image gets its own scale and crop, as in the released
    code. All randomness comes from torch's RNG, so DataLoader seeding makes it reproducible.

    Flipping: the released code mirrors the rendered skeleton, which puts the left-limb colours on the
    right limbs. With `swap_lr=True` (default) left and right joints are swapped before drawing, so the
    mirrored skeleton keeps its colours anatomically right; `swap_lr=False` reproduces the released code.

    Images come from the LMDB through `data.lmdb.LMDBReader`, so the dataset works in DataLoader workers.
    """

    def __init__(self, root, size=256, split="train", augment=None, scale_jitter=0.05, swap_lr=True):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if not isinstance(size, int) or size <= 0:
            raise InputError(f"size must be a positive int, got {size!r}")
        if not 0 <= scale_jitter < 1:
            raise InputError(f"scale_jitter must be in [0, 1), got {scale_jitter!r}")
        self.root = Path(root)
        self.size = size
        self.split = split
        self.augment = split == "train" if augment is None else augment
        self.scale_jitter = scale_jitter
        self.swap_lr = swap_lr
        self.pairs = read_pairs(self.root / f"{split}_pairs.txt")
        self.images = open_images(self.root, size)

    def __len__(self):
        return len(self.pairs)

    def read_image(self, path):
        """The image of `path` from the LMDB as a PIL RGB image, checked to be size x size."""
        key = image_key(path)
        return decode_image(self.images.get(key), f"LMDB {self.images.path}: image {key!r}", self.size)

    def load_image(self, path):
        """The image of `path` as a float (3, S, S) tensor in [-1, 1], not augmented."""
        return to_tensor(self.read_image(path))

    def load_keypoints(self, path):
        """The keypoints of `path` from its pose file, in the DeepFashion convention."""
        return load_keypoints(pose_path(self.root, path))

    def skeleton(self, path, flip=False, frame=None):
        """The skeleton of `path`, drawn in the crop `frame` of `_view` (default: none) and mirrored if
        `flip` (left and right joints swapped first if `swap_lr`)."""
        scaled, x, y = frame or (self.size, 0, 0)
        keypoints = to_image_coords(self.load_keypoints(path), (scaled, scaled))
        present = (keypoints != MISSING).all(axis=1)
        keypoints[present] -= (x, y)
        if flip and self.swap_lr:
            keypoints = keypoints[FLIP_JOINTS]
        skeleton = draw_skeleton(keypoints, (self.size, self.size))
        return skeleton.flip(-1) if flip else skeleton

    def pair_name(self, index):
        """The output name of pair `index` with its first source, the test-time pair."""
        target, sources = self.pairs[index]
        return pair_name(sources[0], target)

    def choose(self, index):
        """(target, source, flip) of pair `index`: when augmenting a random source, swapped with the
        target with p = 0.5, and a flip with p = 0.5; otherwise the first source, unflipped."""
        target, sources = self.pairs[index]
        if not self.augment:
            return target, sources[0], False
        source = sources[torch.randint(len(sources), ()).item()]
        if torch.rand(()) < 0.5:
            source, target = target, source
        return target, source, bool(torch.rand(()) < 0.5)

    def _view(self, path):
        """The image of `path` (scaled and cropped at random when augmenting) and where it was cropped:
        (scaled size, x offset, y offset)."""
        image = self.read_image(path)
        scaled, x, y = self.size, 0, 0
        if self.augment and self.scale_jitter > 0:
            scaled = int(self.size * (1 + self.scale_jitter * torch.rand(()).item()))
            x, y = torch.randint(0, scaled - self.size + 1, (2,)).tolist()
            image = image.resize((scaled, scaled), Image.BICUBIC).crop((x, y, x + self.size, y + self.size))
        return to_tensor(image), (scaled, x, y)

    def __getitem__(self, index):
        target, source, flip = self.choose(index)
        target_image, target_frame = self._view(target)
        source_image, _ = self._view(source)
        target_skeleton = self.skeleton(target, flip, target_frame)
        if flip:
            target_image, source_image = target_image.flip(-1), source_image.flip(-1)
        return {
            "target": target_image,
            "source": source_image,
            "target_skeleton": target_skeleton,
            "name": pair_name(source, target),
            "target_path": target,
            "source_path": source,
            "flip": flip,
        }


def open_images(root, size):
    """The LMDB of the size x size images of a dataset root, `{root}/{size}-{size}/`."""
    return LMDBReader(Path(root) / f"{size}-{size}", "LMDB",
                      hint=f"make it with python -m scripts.prepare_deepfashion --sizes {size}")


class ImageList(Dataset):
    """The images of `keys` in an LMDB (`open_images`), each turned into a sample by `transform(rgb)`, rgb a
    uint8 (S, S, 3) array."""

    def __init__(self, images, keys, transform, size=None):
        self.images, self.keys, self.transform, self.size = images, list(keys), transform, size

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        key = self.keys[i]
        image = decode_image(self.images.get(key), f"LMDB {self.images.path}: image {key!r}", self.size)
        return self.transform(np.asarray(image))


def pair_images(root):
    """Every image path named by `{root}/train_pairs.txt` and `test_pairs.txt`, sorted."""
    names = set()
    for split in ("train", "test"):
        for target, sources in read_pairs(Path(root) / f"{split}_pairs.txt"):
            names.update([target, *sources])
    return sorted(names)


def resized_pngs(path, root, sizes):
    """The image `{root}/{path}` resized to each size x size (PIL bicubic, as PIDM), as PNG bytes."""
    try:
        with Image.open(Path(root) / path) as image:
            image = image.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"cannot read image {Path(root) / path}: {e}") from None
    pngs = []
    for size in sizes:
        buffer = io.BytesIO()
        image.resize((size, size), Image.BICUBIC).save(buffer, format="png")
        pngs.append(buffer.getvalue())
    return path, pngs


def prepare_lmdbs(root, sizes=(256,), out=None, workers=1, overwrite=False, progress=True):
    """Write `{out}/{S}-{S}/` LMDBs (out defaults to root) of every image of the pair files.

    Every image must exist under `root` before anything is written; the error lists the missing ones.
    """
    root = Path(root)
    out = Path(out) if out is not None else root
    sizes = sorted(set(sizes))
    if not sizes or any(size <= 0 for size in sizes):
        raise InputError(f"sizes must be positive ints, got {sizes}")
    if workers < 1:
        raise InputError(f"workers must be at least 1, got {workers}")
    paths = pair_images(root)
    missing = [path for path in paths if not (root / path).is_file()]
    if missing:
        shown = "\n  ".join(missing[:20]) + ("\n  ..." if len(missing) > 20 else "")
        raise MissingFileError(f"{len(missing)} of {len(paths)} images of the pair files are missing "
                                f"under {root}:\n  {shown}")
    resize = partial(resized_pngs, root=root, sizes=sizes)
    with ExitStack() as stack:
        writers = [stack.enter_context(LMDBWriter(out / f"{size}-{size}", overwrite)) for size in sizes]
        pool = stack.enter_context(Pool(workers)) if workers > 1 else None
        results = pool.imap_unordered(resize, paths, chunksize=16) if pool else map(resize, paths)
        for path, pngs in tqdm(results, total=len(paths), desc="images", disable=not progress):
            for writer, png in zip(writers, pngs):
                writer.put(image_key(path), png)
    return [writer.path for writer in writers]

