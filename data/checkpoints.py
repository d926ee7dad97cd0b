"""The checkpoints of a training run, `{out}/checkpoints/{step:07d}.pt`.

Each is written durably (data/files.py: staged, flushed to the disk, renamed, the folder flushed), so a crash
at any moment leaves the set as it was or with the new one complete. Only then are older ones deleted, down to
the newest `keep_last` plus every `keep_every`-th step, kept for good. Before writing, the free space is
checked: a checkpoint that would not fit stops the run, and the last good one stays.
"""
import errno
import shutil
from pathlib import Path

import torch

from data.errors import OutOfSpaceError
from data.files import STAGING_SUFFIX, atomic_path, discard

FOLDER = "checkpoints"
SLACK = 1 << 20  # bytes torch.save adds beyond the tensors' own: names, pickled structure, alignment


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
