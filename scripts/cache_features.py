"""Run the frozen encoders once per training image and flip, and store their outputs in an LMDB.

  python -m scripts.cache_features --config configs/xmdpt_s.yaml [--out datasets/deepfashion/features-256]

Then train with `data.cache=<out> data.scale_jitter=0`. Per image and flip the cache holds the DINOv2 pose
tokens of its skeleton, the DINOv2 image tokens and the first stage's posterior moments (data/cache.py). The
LMDB is written beside `<out>` and renamed when complete.
"""
import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save as save_bytes
from tqdm.auto import tqdm

from configs import load_config
from data.cache import META_KEY, cache_key, encoder_signature
from data.deepfashion import PairDataset
from data.lmdb import LMDBWriter
from devices import default_device
from models.encoders import build_encoders


def training_images(pairs):
    """Every image a training pair can use, as target or source, in first-seen order."""
    return list(dict.fromkeys(path for target, sources in pairs.pairs for path in (target, *sources)))


@torch.no_grad()
def cache_features(cfg, out, batch_size=16, dtype=torch.float16, device="cpu", overwrite=True, progress=True):
    """Write the cache of `cfg`'s training images to `out`; returns the number of entries."""
    d = cfg["data"]
    pairs = PairDataset(d["root"], d["size"], "train", augment=False)
    encoders = build_encoders(cfg["encoders"], device)
    jobs = [(path, flip) for path in training_images(pairs) for flip in (False, True)]
    with LMDBWriter(out, overwrite=overwrite) as writer:
        for i in tqdm(range(0, len(jobs), batch_size), disable=not progress, desc="caching features"):
            chunk = jobs[i:i + batch_size]
            images = torch.stack([pairs.load_image(p).flip(-1) if f else pairs.load_image(p) for p, f in chunk])
            skeletons = torch.stack([pairs.skeleton(p, f) for p, f in chunk])
            images, skeletons = images.to(device), skeletons.to(device)
            pose, image = encoders.pose(skeletons), encoders.image(images)
            mean, logvar = encoders.first_stage.moments(images)
            for j, (path, flip) in enumerate(chunk):
                record = {"pose": pose[j].to(dtype), "image": image[j].to(dtype), "mean": mean[j].float(),
                          "logvar": logvar[j].float()}
                writer.put(cache_key(path, flip), save_bytes({k: v.contiguous().cpu() for k, v in record.items()}))
        meta = {"signature": encoder_signature(cfg["encoders"], d["size"]), "entries": len(jobs)}
        writer.put(META_KEY, json.dumps(meta).encode())
    return len(jobs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training config: its data and encoders sections are used")
    parser.add_argument("--out", help="cache LMDB directory (default: <data.root>/features-<data.size>)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per encoder batch")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                        help="storage type of the DINOv2 tokens (the moments are always float32)")
    parser.add_argument("--device", default=str(default_device()), help="torch device")
    parser.add_argument("overrides", nargs="*", help="config overrides such as data.root=datasets/other")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    out = args.out or Path(cfg["data"]["root"]) / f"features-{cfg['data']['size']}"
    n = cache_features(cfg, out, args.batch_size, getattr(torch, args.dtype), args.device)
    print(f"cached {n} image/flip entries in {out}; train with data.cache={out} data.scale_jitter=0")


if __name__ == "__main__":
    main()
