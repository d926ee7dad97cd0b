"""Feature cache: the frozen encoders' outputs for every image and flip, stored once in an LMDB.

Per image path and flip it holds the DINOv2-B tokens of the image's skeleton (used when the image is the
target), the DINOv2-G tokens of the image (used when it is the source) and the first stage's posterior
moments (a fresh latent is sampled from them every step, as the online path does). Scale jitter changes
the pixels every step, so it cannot be cached: training with a cache requires data.scale_jitter = 0.
"""
import json
import os

import lmdb
import torch
from safetensors.torch import load as load_bytes
from torch.utils.data import Dataset

META_KEY = b"__meta__"


def cache_key(path, flip):
    return f"{path}|{int(bool(flip))}".encode("utf-8")


def encoder_signature(encoders_cfg, size):
    """What the cached features depend on; a cache made otherwise is refused."""
    return json.dumps({"encoders": encoders_cfg, "size": size}, sort_keys=True)


class FeatureCache:
    """Read-only access to a cache LMDB, opened lazily in each process."""

    def __init__(self, path, signature=None):
        self.path = str(path)
        if not os.path.isfile(os.path.join(self.path, "data.mdb")):
            raise FileNotFoundError(f"feature cache not found: {self.path} (make it with scripts/cache_features.py)")
        self._env, self._pid = None, None
        meta = json.loads(self._get(META_KEY, "metadata"))
        if signature is not None and meta["signature"] != signature:
            raise ValueError(f"feature cache {self.path} was made for {meta['signature']}, "
                             f"but this run uses {signature}; rebuild it with scripts/cache_features.py")

    def __getstate__(self):
        return {**self.__dict__, "_env": None, "_pid": None}

    def _get(self, key, what):
        if self._env is None or self._pid != os.getpid():
            self._env = lmdb.open(self.path, readonly=True, lock=False, readahead=False, meminit=False)
            self._pid = os.getpid()
        with self._env.begin() as txn:
            value = txn.get(key)
        if value is None:
            raise KeyError(f"feature cache {self.path} has no entry {key.decode()!r} ({what})")
        return value

    def get(self, path, flip):
        """dict of float32 tensors: pose (257, dp), image (257, di), mean and logvar (C, h, w)."""
        key = cache_key(path, flip)
        return {k: v.float() for k, v in load_bytes(self._get(key, "image features")).items()}


class CachedPairs(Dataset):
    """A PairDataset's pairs and augmentation choices, with cached features instead of pixels."""

    def __init__(self, pairs, cache):
        if pairs.augment and pairs.scale_jitter > 0:
            raise ValueError("a feature cache cannot hold scale-jittered images: set data.scale_jitter=0")
        self.pairs, self.cache = pairs, cache

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        target, source, flip = self.pairs.choose(index)
        t, s = self.cache.get(target, flip), self.cache.get(source, flip)
        return {"target_pose_tokens": t["pose"], "source_image_tokens": s["image"],
                "target_mean": t["mean"], "target_logvar": t["logvar"],
                "source_mean": s["mean"], "source_logvar": s["logvar"],
                "target_path": target, "source_path": source, "flip": flip}
