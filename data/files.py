"""Atomic writes: a file or folder is written beside its destination and renamed into place when complete, so
that nothing half-written ever carries the destination's name and nothing already there is lost on failure.

A durable write also survives a power cut or a dead node: the staged file (every file of a staged folder) is
flushed to the disk before the rename that publishes it, and the folder that holds it after, so that the name
never points at data the disk does not have yet.
"""
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

STAGING_SUFFIX = ".partial"


def staging_path(path):
    """Where `path` is written before it is published: a hidden sibling, on the same filesystem."""
    path = Path(path)
    return path.with_name(f".{path.name}{STAGING_SUFFIX}")


def discard(path):
    """Remove a file or folder, if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def fsync(path):
    """Flush a file, or a folder's entry list, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(staged, path, durable=False):
    """Move the finished `staged` file or folder to `path`, replacing what was there. A file is replaced by one
    rename; a folder by two (the old one is moved aside first and deleted last). `durable`: flush the staged
    data before the rename, and the parent folder after it."""
    staged, path = Path(staged), Path(path)
    if durable:
        for file in [staged] if staged.is_file() else [p for p in staged.rglob("*") if p.is_file()] + [staged]:
            fsync(file)
    if staged.is_dir() and path.exists():
        old = path.with_name(f".{path.name}.old")
        discard(old)
        os.replace(path, old)
        os.replace(staged, path)
        discard(old)
    else:
        os.replace(staged, path)
    if durable:
        fsync(path.parent)


@contextmanager
def atomic_path(path, durable=False):
    """Yield a staging path for `path`; write the file or folder there. When the block ends it replaces `path`
    (`durable`: flushed to the disk, see `publish`); when the block raises (Ctrl-C included) it is removed and
    `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = staging_path(path)
    discard(staged)
    try:
        yield staged
    except BaseException:
        discard(staged)
        raise
    publish(staged, path, durable)
