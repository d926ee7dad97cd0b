"""Atomic writes: a file or folder is written beside its destination and renamed into place when complete, so
that nothing half-written ever carries the destination's name and nothing already there is lost on failure.
"""
import os
import shutil
from contextlib import contextmanager
from pathlib import Path


def staging_path(path):
    """Where `path` is written before it is published: a hidden sibling, on the same filesystem."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def discard(path):
    """Remove a file or folder, if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def publish(staged, path):
    """Move the finished `staged` file or folder to `path`, replacing what was there. A file is replaced by one
    rename; a folder by two (the old one is moved aside first and deleted last)."""
    staged, path = Path(staged), Path(path)
    if staged.is_dir() and path.exists():
        old = path.with_name(f".{path.name}.old")
        discard(old)
        os.replace(path, old)
        os.replace(staged, path)
        discard(old)
    else:
        os.replace(staged, path)


@contextmanager
def atomic_path(path):
    """Yield a staging path for `path`; write the file or folder there. When the block ends it replaces `path`;
    when the block raises (Ctrl-C included) it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = staging_path(path)
    discard(staged)
    try:
        yield staged
    except BaseException:
        discard(staged)
        raise
    publish(staged, path)
