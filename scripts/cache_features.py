"""Run the frozen encoders once per training image and flip, and store their outputs in an LMDB.

  python scripts/cache_features.py --config configs/xmdpt_s.yaml [--out datasets/deepfashion/features-256]

Then train with `data.cache=<out> data.scale_jitter=0`. Per image and flip the cache holds the DINOv2 pose
tokens of its skeleton, the DINOv2 image tokens and the first stage's posterior moments. The LMDB is written
to `<out>.partial` and renamed when complete.
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import lmdb
import torch
from safetensors.torch import save as save_bytes
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configs import load_config  # noqa: E402
from data.cache import META_KEY, cache_key, encoder_signature  # noqa: E402
from data.deepfashion import PairDataset  # noqa: E402
from data.pose import dino_input  # noqa: E402
from models.encoders import build_encoders  # noqa: E402


def training_images(pairs):
    """Every image a training pair can use, as target or source, in first-seen order."""
    return list(dict.fromkeys(path for target, sources in pairs.pairs for path in (target, *sources)))


@torch.no_grad()
def cache_features(cfg, out, batch_size=16, dtype=torch.float16, device="cpu", map_size=1 << 40, progress=True):
    d = cfg["data"]
    pairs = PairDataset(d["root"], d["size"], "train", augment=False)
    encoders = build_encoders(cfg["encoders"], device)
    jobs = [(path, flip) for path in training_images(pairs) for flip in (False, True)]
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    env = lmdb.open(str(partial), map_size=map_size)
    try:
        for i in tqdm(range(0, len(jobs), batch_size), disable=not progress, desc="caching features"):
            chunk = jobs[i:i + batch_size]
            images = torch.stack([pairs.load_image(p).flip(-1) if f else pairs.load_image(p) for p, f in chunk])
            skeletons = torch.stack([pairs.skeleton(p, f) for p, f in chunk])
            images, skeletons = images.to(device), skeletons.to(device)
            pose = encoders.pose(dino_input(skeletons))
            image = encoders.image(dino_input(images))
            mean, logvar = encoders.first_stage.moments(images)
            with env.begin(write=True) as txn:
                for j, (path, flip) in enumerate(chunk):
                    record = {"pose": pose[j].to(dtype), "image": image[j].to(dtype),
                              "mean": mean[j].float(), "logvar": logvar[j].float()}
                    txn.put(cache_key(path, flip), save_bytes({k: v.contiguous().cpu() for k, v in record.items()}))
        with env.begin(write=True) as txn:
            meta = {"signature": encoder_signature(cfg["encoders"], d["size"]), "entries": len(jobs)}
            txn.put(META_KEY, json.dumps(meta).encode())
        env.close()
    except BaseException:
        env.close()
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return len(jobs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training config: its data and encoders sections are used")
    parser.add_argument("--out", help="cache LMDB directory (default: <data.root>/features-<data.size>)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per encoder batch")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                        help="storage type of the DINOv2 tokens (the moments are always float32)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("overrides", nargs="*", help="config overrides such as data.root=datasets/other")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    out = args.out or Path(cfg["data"]["root"]) / f"features-{cfg['data']['size']}"
    n = cache_features(cfg, out, args.batch_size, getattr(torch, args.dtype), args.device)
    print(f"cached {n} image/flip entries in {out}; train with data.cache={out} data.scale_jitter=0")


if __name__ == "__main__":
    main()
