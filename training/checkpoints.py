"""The checkpoints of a training run, `{out}/checkpoints/{step:07d}.pt`: what they hold, how they are written and
kept, and how a run resumes from one.

A checkpoint holds the model, its EMA, the optimizer, the step, the architecture and the run's config, the
objective's own state (the networks and optimizer of a distillation, when it has them), and each process's
random states and unlogged loss sums, so that a resumed run continues exactly as an uninterrupted one.
Each is written durably (data/files.py: staged, flushed to the disk, renamed, the folder flushed), so a crash
at any moment leaves the set as it was or with the new one complete. Only then are older ones deleted, down to
the newest `keep_last` plus every `keep_every`-th step, kept for good. Before writing, the free space is
checked: a checkpoint that would not fit stops the run, and the last good one stays.
"""
import errno
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from data.errors import InputError, OutOfSpaceError, OutputExistsError
from data.files import STAGING_SUFFIX, atomic_path, discard
from models.weights import read_checkpoint

FOLDER = "checkpoints"
SLACK = 1 << 20  # bytes torch.save adds beyond the tensors' own: names, pickled structure, alignment
# Keys of the train section that may change between a run and its resumption.
RUN_KEYS = {"max_steps", "ckpt_every", "log_every", "sample_every", "workers", "keep_last", "keep_every", "compile"}


def checkpoints(out):
    """The run's checkpoints as (step, path) pairs, oldest first."""
    return sorted((int(p.stem), p) for p in (Path(out) / FOLDER).glob("*.pt") if p.stem.isdigit())


def newest_checkpoint(out):
    """The path of the run's newest checkpoint, or None."""
    found = checkpoints(out)
    return found[-1][1] if found else None


def discard_staged(out):
    """Remove what a run killed in the middle of a save left staged; returns the paths removed."""
    staged = list((Path(out) / FOLDER).glob(f".*{STAGING_SUFFIX}"))
    for path in staged:
        discard(path)
    return staged


def tensor_bytes(obj):
    """The bytes of every tensor in nested dicts, lists and tuples."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_checkpoint(out, step, contents, keep_last=3, keep_every=None):
    """Write `contents` as the checkpoint of `step`, durably, then delete the ones no longer kept; returns its
    path. An OutOfSpaceError, before anything is written, when the folder has not room for it."""
    folder = Path(out) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{step:07d}.pt"
    needed, free = tensor_bytes(contents) + SLACK, shutil.disk_usage(folder).free
    if needed > free:
        raise out_of_space(folder, step, needed, free, out)
    try:
        with atomic_path(path, durable=True) as staged:
            torch.save(contents, staged)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise out_of_space(folder, step, needed, shutil.disk_usage(folder).free, out) from None
        raise
    prune(out, keep_last, keep_every)
    return path


def out_of_space(folder, step, needed, free, out):
    return OutOfSpaceError(f"no room in {folder} for the checkpoint of step {step}: it needs {needed:,} bytes and "
                           f"{free:,} are free; stopping, with the last good checkpoint kept "
                           f"({newest_checkpoint(out) or 'none yet'}). Free some space (train.keep_last keeps fewer) "
                           f"and continue with --resume")


def prune(out, keep_last=3, keep_every=None):
    """Delete every checkpoint but the newest `keep_last` and, with `keep_every`, the steps it divides."""
    found = checkpoints(out)
    kept = {step for step, _ in found[-keep_last:]} if keep_last else set()
    for step, path in found:
        if step not in kept and not (keep_every and step % keep_every == 0):
            path.unlink()


def checkpoint_to_resume(cfg, out, resume, rank):
    """The contents of the newest checkpoint in `out` when resuming (refused if it holds another config), else
    None (refused if `out` already holds checkpoints)."""
    newest = newest_checkpoint(out)
    if not resume:
        if newest is not None and rank == 0:
            raise OutputExistsError(f"{out} already holds checkpoints; pass --resume to continue, or another --out")
        return None
    if newest is None:
        return None
    contents = read_checkpoint(newest).contents
    diffs = config_differences(contents["run_config"], cfg)
    if diffs:
        raise InputError(f"{out} holds a run of another config; refusing to resume:\n  " + "\n  ".join(diffs))
    return contents


def config_differences(saved, current, prefix=""):
    """The keys in which two configs differ, as 'key: a in the run, b now' lines (RUN_KEYS may differ)."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if key in RUN_KEYS:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} in the run, {b!r} now")
    return diffs


def rng_state():
    """This process's random states (torch, Python, NumPy and CUDA), as tensors and numbers torch.save keeps."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                      "gauss": gauss}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    """Restore the random states `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
