"""Where the evaluation's images come from: the protocol's file names, folders of images, and the training
images of a DeepFashion LMDB.

Names (docs/evaluation.md): a DeepFashion image path becomes a flat name,
img/WOMEN/Blouses_Shirts/id_00000637/03_1_front.jpg -> fashionWOMENBlouses_Shirtsid0000063703_1front, and the
image generated for a pair is `{source}_2_{target}_vis.png` in flat names. The LMDBs that
scripts/prepare_deepfashion.py writes store each image under its path with a .png extension, as PNG bytes.

This module needs nothing of the project outside eval/, so that eval/ can be copied next to anyone's outputs.
"""
import hashlib
import os
from pathlib import Path

import cv2
import lmdb
import numpy as np
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def flat_name(path):
    """The flat file name of a DeepFashion image path, without extension."""
    parts = path.removeprefix("img/").split("/")
    if len(parts) != 4:
        raise ValueError(f"expected an image path img/<group>/<category>/<id>/<file>, got {path!r}")
    group, category, identity, file = parts
    head, _, tail = os.path.splitext(file)[0].partition("_")
    return f"fashion{group}{category}{identity.replace('_', '')}{head}_{tail.replace('_', '')}"


def pair_name(source, target):
    """The file name (without extension) of the image generated for a pair: `{source}_2_{target}_vis`."""
    return f"{flat_name(source)}_2_{flat_name(target)}_vis"


def legacy_target(name):
    """The target part of a generated file's name `{source}_2_{target}_vis.png`; None for any other name."""
    stem = Path(name).stem
    if not stem.endswith("_vis") or stem[:-4].count("_2_") != 1:
        return None
    return stem[:-4].split("_2_")[1]


def image_key(path):
    """The LMDB key of an image path: the path with its extension replaced by .png."""
    return os.path.splitext(path)[0] + ".png"


def listed_keys(stored, image_list, where):
    """The keys among `stored` (an LMDB's keys) of the images an image list names, in its order. Its lines are
    image paths or flat names (PIDM's train.lst), each with an extension. A name with no stored image is a
    KeyError that counts them and names the first few, and `where` (the LMDB)."""
    index = {key: key for key in stored}
    index.update({image_key(flat_name(key)): key for key in stored if key.startswith("img/")})
    wanted = [image_key(line.strip()) for line in Path(image_list).read_text().splitlines() if line.strip()]
    missing = [name for name in wanted if name not in index]
    if missing:
        raise KeyError(f"{len(missing)} of the {len(wanted)} images of {image_list} are not in {where} "
                       f"(first: {', '.join(missing[:3])})")
    return [index[name] for name in wanted]


def decode_rgb(data, name):
    """Encoded image bytes -> uint8 RGB array (H, W, 3); a ValueError naming `name` if they are no image."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"cannot decode image {name}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_rgb(path):
    """An image file as uint8 RGB (H, W, 3)."""
    return decode_rgb(Path(path).read_bytes(), path)


def list_images(folder):
    """The image files directly inside `folder`, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def legacy_ground_truth(name, target_dir):
    """The ground-truth file of a legacy name: `{target}.png` (or .jpg/.jpeg) in `target_dir`."""
    target = legacy_target(name)
    if target is None:
        raise ValueError(f"{name} is not a legacy name `{{source}}_2_{{target}}_vis.png`")
    candidates = [Path(target_dir) / f"{target}{ext}" for ext in IMAGE_EXTENSIONS]
    return next((p for p in candidates if p.is_file()), candidates[0])


def pair_files(generated_dir, target_dir, naming="auto"):
    """(ground truth, generated) path pairs, one per image of `generated_dir`.

    naming: "same" (identical file names in both folders), "legacy" (the ground truth is the target part of
    `{source}_2_{target}_vis.png`) or "auto" (same names when they all exist, else legacy when all names are
    legacy ones). A missing ground-truth file is an error naming it.
    """
    generated, target_dir = list_images(generated_dir), Path(target_dir)
    if not generated:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {generated_dir}")
    if naming == "auto":
        all_same = all((target_dir / p.name).is_file() for p in generated)
        all_legacy = all(legacy_target(p.name) is not None for p in generated)
        naming = "legacy" if all_legacy and not all_same else "same"
    pairs = []
    for path in generated:
        gt = target_dir / path.name if naming == "same" else legacy_ground_truth(path.name, target_dir)
        if not gt.is_file():
            raise FileNotFoundError(f"missing ground-truth image {gt} (for {path.name})")
        pairs.append((gt, path))
    return pairs


class ImageFiles(Dataset):
    """Image files, each turned into a network input by `transform(rgb)`."""

    def __init__(self, paths, transform):
        self.paths, self.transform = list(paths), transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(read_rgb(self.paths[i]))

    def fingerprint(self):
        """Names, sizes and modification times of the files."""
        digest = hashlib.sha1()
        for path in self.paths:
            stat = path.stat()
            digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()


class LmdbImages(Dataset):
    """The images of an image list (train.lst) in an LMDB folder, each turned into a network input by
    `transform(rgb)`. Each process opens the LMDB itself on first read, so DataLoader workers never use an
    environment opened before they were forked."""

    def __init__(self, folder, image_list, transform):
        self.folder, self.transform = Path(folder), transform
        if not (self.folder / "data.mdb").is_file():
            raise FileNotFoundError(f"LMDB real set not found: {self.folder} (expected {self.folder / 'data.mdb'})")
        env = lmdb.open(str(self.folder), readonly=True, lock=False)
        try:
            with env.begin() as txn:
                stored = [key.decode("utf-8") for key in txn.cursor().iternext(keys=True, values=False)]
                self.keys = listed_keys(stored, image_list, f"the LMDB {self.folder}")
                self.sizes = [len(txn.get(key.encode("utf-8"))) for key in self.keys]
        finally:
            env.close()
        self._env, self._pid = None, None

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        if self._pid != os.getpid():
            self._env, self._pid = lmdb.open(str(self.folder), readonly=True, lock=False), os.getpid()
        with self._env.begin() as txn:
            data = txn.get(self.keys[i].encode("utf-8"))
        return self.transform(decode_rgb(data, f"{self.keys[i]} in the LMDB {self.folder}"))

    def __getstate__(self):
        return dict(self.__dict__, _env=None, _pid=None)

    def fingerprint(self):
        """The keys, the length of each value, and data.mdb's size and modification time."""
        stat = (self.folder / "data.mdb").stat()
        digest = hashlib.sha1(f"{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        for key, size in zip(self.keys, self.sizes):
            digest.update(f"{key}\0{size}\n".encode())
        return digest.hexdigest()


def real_images(path, size, transform):
    """The FID real set: a folder of images, an LMDB folder `{root}/{size}-{size}` with `{root}/train.lst`,
    or `{root}` itself (the LMDB of `size` is used)."""
    path = Path(path)
    if (path / "data.mdb").is_file():
        folder, image_list = path, path.parent / "train.lst"
    elif (path / "train.lst").is_file():
        folder, image_list = path / f"{size}-{size}", path / "train.lst"
    else:
        images = list_images(path)
        if not images:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {path}")
        return ImageFiles(images, transform)
    if not image_list.is_file():
        raise FileNotFoundError(f"{image_list} not found (needed for the LMDB real set)")
    try:
        return LmdbImages(folder, image_list, transform)
    except KeyError as e:
        raise KeyError(f"{e.args[0]}; pass a folder of the training images instead") from None
