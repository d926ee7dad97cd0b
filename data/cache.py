"""Feature cache: the frozen encoders' outputs for every image and flip, stored once in an LMDB.

Per image path and flip it holds the DINOv2-B tokens of the image's skeleton (used when the image is the
target), the DINOv2-G tokens of the image (used when it is the source) and the first stage's posterior
moments (a fresh latent is sampled from them every step, as the online path does). Scale jitter changes
the pixels every step, so it cannot be cached: training with a cache requires data.scale_jitter = 0.
"""
import json

from safetensors.torch import load as load_bytes
from torch.utils.data import Dataset

from data.errors import InputError
from data.lmdb import LMDBReader

META_KEY = "__meta__"


def cache_key(path, flip):
    """The cache's key of an image path, flipped or not."""
    return f"{path}|{int(bool(flip))}"


def encoder_signature(encoders_cfg, size):
    """What the cached features depend on; a cache made otherwise is refused."""
    return json.dumps({"encoders": encoders_cfg, "size": size}, sort_keys=True)


class FeatureCache:
    """Read access to a cache made by scripts/cache_features.py, checked against the encoders' `signature`."""

    def __init__(self, path, signature=None):
        self.lmdb = LMDBReader(path, "feature cache", hint="make it with python -m scripts.cache_features")
        meta = json.loads(self.lmdb.get(META_KEY))
        if signature is not None and meta["signature"] != signature:
            raise InputError(f"feature cache {path} was made for {meta['signature']}, "
                             f"but this run uses {signature}; rebuild it with python -m scripts.cache_features")

    def get(self, path, flip):
        """dict of float32 tensors: pose (257, dp), image (257, di), mean and logvar (C, h, w)."""
        return {k: v.float() for k, v in load_bytes(self.lmdb.get(cache_key(path, flip))).items()}


class CachedPairs(Dataset):
    """A PairDataset's pairs and augmentation choices, with cached features instead of pixels: the layout
    `models.encoders.Encoders.features` gives for a batch of pixels."""

    def __init__(self, pairs, cache):
        if pairs.augment and pairs.scale_jitter > 0:
            raise InputError("a feature cache cannot hold scale-jittered images: set data.scale_jitter=0")
        self.pairs, self.cache = pairs, cache

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        target, source, flip = self.pairs.choose(index)
        t, s = self.cache.get(target, flip), self.cache.get(source, flip)
        return {"pose": t["pose"], "image": s["image"], "target_mean": t["mean"], "target_logvar": t["logvar"],
                "source_mean": s["mean"], "source_logvar": s["logvar"],
                "target_path": target, "source_path": source, "flip": flip}
