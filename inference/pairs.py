"""Test pairs through the pipeline: outputs named as the evaluation expects, resumable, with grids and scores.

Each pair is written as <out>/generated/{name}.png, with its ground truth <out>/target/{name}.png and source
<out>/source/{name}.png under the same name ({source}_2_{target}_vis, see eval/fid_ssim_lpips.py), plus
<out>/grids/{name}.png (source | target | skeleton | generated). Pair i's noise comes from item_seed(seed, i)
(data/sampler.py), so an image depends on neither the batch size nor the order of generation.
"""
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from data.deepfashion import PairDataset
from data.images import grid_row, save_png
from data.sampler import item_seed

KINDS = ("generated", "target", "source")


def generate_pairs(pipe, data_root, out, batch_size=16, seed=0, limit=None, overwrite=False, grids=True, rank=0,
                   world=1, barrier=None, **settings):
    """Generate every test pair of `data_root` (or the first `limit`); returns the names of all of them and how
    many this process generated. Pairs whose outputs exist are skipped unless `overwrite`; `settings` go to the
    pipeline's sampler.

    Across `world` processes (torchrun), process `rank` takes every world-th batch of the batches a single
    process would make, so each pair is generated in the same batch, and comes out the same; every process
    lists what exists before any writes (`barrier`, called in between, waits for all of them).
    """
    out = Path(out)
    pairs = PairDataset(data_root, pipe.size, "test")
    count = len(pairs) if limit is None else min(limit, len(pairs))
    names = [pairs.pair_name(i) for i in range(count)]
    todo = [i for i, name in enumerate(names)
            if overwrite or not all((out / kind / f"{name}.png").is_file() for kind in KINDS)]
    if barrier is not None:
        barrier()
    if len(todo) < count and rank == 0:
        print(f"{count - len(todo)} of {count} pairs already generated in {out}; skipping them "
              f"(--overwrite regenerates)")
    batches = [todo[start:start + batch_size] for start in range(0, len(todo), batch_size)][rank::world]
    for batch in tqdm(batches, desc="pairs", unit="batch", disable=rank != 0):
        items = [pairs[i] for i in batch]
        stack = lambda k: torch.stack([it[k] for it in items])
        images = pipe(stack("source"), skeletons=stack("target_skeleton"), seeds=[item_seed(seed, i) for i in batch],
                      **settings)
        for item, image in zip(items, images):
            name = item["name"]
            save_png(image, out / "generated" / f"{name}.png")
            save_png(item["target"], out / "target" / f"{name}.png")
            save_png(item["source"], out / "source" / f"{name}.png")
            if grids:
                save_png(grid_row(item["source"], item["target"], item["target_skeleton"] * 2 - 1, image),
                         out / "grids" / f"{name}.png")
    return names, sum(len(batch) for batch in batches)


def mean_scores(out, names):
    """Mean SSIM and PSNR (eval/metrics.py) of the generated and of the source images against the targets."""
    from eval.metrics import psnr, ssim
    out = Path(out)
    read = lambda kind, name: np.asarray(Image.open(out / kind / f"{name}.png").convert("RGB"))
    scores = {"generated": ([], []), "source": ([], [])}
    for name in names:
        target = read("target", name)
        for kind, (ssims, psnrs) in scores.items():
            image = read(kind, name)
            ssims.append(ssim(target, image))
            psnrs.append(psnr(target, image))
    return {kind: (float(np.mean(s)), float(np.mean(p))) for kind, (s, p) in scores.items()}
