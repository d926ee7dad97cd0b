"""Test pairs through the pipeline: outputs named as the evaluation expects, resumable, with grids and scores.

Each pair is written as <out>/generated/{name}.png, with its ground truth <out>/target/{name}.png and source
<out>/source/{name}.png under the same name ({source}_2_{target}_vis, see eval/fid_ssim_lpips.py), plus
<out>/grids/{name}.png (source | target | skeleton | generated). Pair i's noise comes from item_seed(seed, i)
(data/sampler.py), so an image depends on neither the batch size nor the order of generation.

Pairs are generated grouped by their source photo, and each photo's share of the encoding (DINOv2-G and the VAE
encoder, `Pipeline.encode_sources`) is done once for all of its pairs. <out>/made_by.json records the model, the
sampling settings and the seed, so that a resumed run adds only images made the same way (`claim`).
"""
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate
from tqdm.auto import tqdm

from data.deepfashion import PairDataset
from data.errors import InputError
from data.files import atomic_path
from data.images import grid_row, save_png
from data.sampler import item_seed

KINDS = ("generated", "target", "source")
MADE_BY = "made_by.json"


def made_by(pipe, settings, **more):
    """What makes a folder's images, as `claim` records it: the model and its weights, the sampling settings, the
    seed, `more`."""
    return dict(model=pipe.description, checkpoint=pipe.checkpoint, sampling=asdict(settings), **more)


def check_claim(out, record, names, overwrite):
    """A folder holds the images of one making. With images in <out>/generated made otherwise than `record` says
    (its made_by.json differs), an InputError naming the record and what differs, unless `overwrite` and this run
    writes every one of them again (`names`, file names): then returns them, for `claim` to delete first, so that
    an interrupted run leaves none of the old making under the new record. Images without a record are taken as
    they are."""
    path, folder = Path(out) / MADE_BY, Path(out) / "generated"
    made = sorted(p.name for p in folder.glob("*.png")) if folder.is_dir() else []
    if not made or not path.is_file():
        return []
    try:
        before = flat(json.loads(path.read_text()))
    except (OSError, ValueError) as e:
        raise InputError(f"{path} is unreadable ({e}); delete it, or pass another --out") from None
    record = flat(json.loads(json.dumps(record)))  # as the file would hold it
    differ = [f"{k} {before.get(k)} -> {record.get(k)}" for k in sorted(set(before) | set(record))
              if before.get(k) != record.get(k)]
    if not differ:
        return []
    left = set(made) - set(names)
    if overwrite and not left:
        return made
    advice = (f"--overwrite would leave {len(left)} of them, which this run does not make: use another --out"
              if overwrite else "pass --overwrite to replace them, or another --out")
    raise InputError(f"{out} holds images made otherwise ({path}: {'; '.join(differ)}); {advice}")


def flat(record):
    """{"sampling": {"steps": 50}} -> {"sampling.steps": 50}."""
    return {f"{k}.{sub}" if isinstance(v, dict) else k: w for k, v in record.items()
            for sub, w in (v.items() if isinstance(v, dict) else [(None, v)])}


def claim(out, record, stale=()):
    """Delete the `stale` images (`check_claim`'s; each generated image and its grid), then write `record` (see
    `made_by`) as <out>/made_by.json."""
    for name in stale:
        for kind in ("generated", "grids"):
            (Path(out) / kind / name).unlink(missing_ok=True)
    with atomic_path(Path(out) / MADE_BY) as staged:
        staged.write_text(json.dumps(record, indent=1) + "\n")


def by_source(pairs, count):
    """The indices of the first `count` test pairs grouped by their source photo, in the order each photo first
    appears: {source path: [pair indices]}."""
    groups = {}
    for i in range(count):
        groups.setdefault(pairs.pairs[i][1][0], []).append(i)
    return groups


def generate_pairs(pipe, data_root, out, *, settings=None, batch_size=16, seed=0, limit=None, overwrite=False,
                   grids=True, rank=0, world=1, barrier=None, reuse_sources=True):
    """Generate every test pair of `data_root` (or the first `limit`), sampled as `settings` (a Sampling; None:
    the pipeline's defaults); returns the names of all of them and how many this process generated. Pairs whose
    outputs exist are skipped unless `overwrite`. `reuse_sources`: encode each source photo once for all its
    pairs (False: once per pair; the images are the same).

    Across `world` processes (torchrun), process `rank` takes every world-th source photo with all of its pairs,
    so no two processes encode the same photo, and the split depends on the pair list alone, so that a resumed
    run splits as the first did. Every process lists what exists before any writes (`barrier`, called in
    between, waits for all of them).
    """
    out = Path(out)
    pairs = PairDataset(data_root, pipe.size, "test")
    count = len(pairs) if limit is None else min(limit, len(pairs))
    names = [pairs.pair_name(i) for i in range(count)]
    done = {i for i, name in enumerate(names) if all((out / kind / f"{name}.png").is_file() for kind in KINDS)}
    record = made_by(pipe, settings or pipe.settings(), seed=seed)
    stale = check_claim(out, record, [f"{name}.png" for name in names], overwrite)
    if rank == 0:
        claim(out, record, stale)
    if barrier is not None:
        barrier()
    if done and not overwrite and rank == 0:
        print(f"{len(done)} of {count} pairs already generated in {out}; skipping them (--overwrite regenerates)")
    groups = list(by_source(pairs, count).values())
    if rank == 0 and reuse_sources:
        print(f"{count} pairs of {len(groups)} source photos, each photo encoded once for all its pairs")
    mine = [i for group in groups[rank::world] for i in group]
    todo = [i for i in mine if overwrite or i not in done]
    batches = [todo[start:start + batch_size] for start in range(0, len(todo), batch_size)]
    encoded = {}  # source path -> its features, while pairs of it may remain
    for batch in tqdm(batches, desc="pairs", unit="batch", disable=rank != 0):
        items = default_collate([pairs[i] for i in batch])
        paths = items["source_path"]
        if reuse_sources:
            new = {p: j for j, p in enumerate(paths) if p not in encoded}
            if new:
                features = pipe.encode_sources(items["source"][list(new.values())])
                encoded.update({p: {k: v[j:j + 1] for k, v in features.items()} for j, p in enumerate(new)})
            sources = {k: torch.cat([encoded[p][k] for p in paths]) for k in encoded[paths[0]]}
            encoded = {paths[-1]: encoded[paths[-1]]}  # the only photo whose pairs may go on into the next batch
        else:
            sources = pipe.encode_sources(items["source"])
        inputs = pipe.pair_inputs(sources, pipe.encode_poses(items["target_skeleton"]),
                                  [item_seed(seed, i) for i in batch])
        images = pipe.decode(pipe.sample(inputs, settings=settings))
        for name, target, source, skeleton, image in zip(items["name"], items["target"], items["source"],
                                                         items["target_skeleton"], images):
            save_png(image, out / "generated" / f"{name}.png")
            save_png(target, out / "target" / f"{name}.png")
            save_png(source, out / "source" / f"{name}.png")
            if grids:
                save_png(grid_row(source, target, skeleton * 2 - 1, image), out / "grids" / f"{name}.png")
    return names, len(todo)


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
