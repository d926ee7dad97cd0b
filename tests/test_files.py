"""Durable writes, against the rule written out here: a checkpoint's or an export's bytes reach the disk (fsync of
every file it is made of, and of a staged folder itself) before the rename that gives them their name, and the
folder that holds the name is flushed after the rename, so that no crash leaves a name pointing at data the disk
does not have. The calls are recorded as the real writers make them."""
import os
from pathlib import Path

import pytest
import torch

from models import XMDPT, export
from training.checkpoints import save_checkpoint


@pytest.fixture
def disk(monkeypatch):
    """The order of fsyncs (by the path each file descriptor was opened on) and renames, as they happen."""
    events, opened = [], {}
    real_open, real_fsync, real_replace = os.open, os.fsync, os.replace

    def open_(path, *args, **kwargs):
        fd = real_open(path, *args, **kwargs)
        opened[fd] = Path(path)
        return fd

    def fsync(fd):
        events.append(("fsync", opened[fd]))
        real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        events.append(("rename", Path(src), Path(dst)))
        real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def published(events, final):
    """(index of the rename that gave `final` its name, the path it was renamed from)."""
    (index, source), = [(i, e[1]) for i, e in enumerate(events) if e[0] == "rename" and e[2] == final]
    return index, source


def flushed(events, path):
    """The indices at which `path` was flushed."""
    return [i for i, e in enumerate(events) if e == ("fsync", path)]


def assert_durable(events, final, files):
    """Every one of `files` (paths inside what was staged) flushed before the rename that published `final`, and
    `final`'s folder flushed after it."""
    rename, staged = published(events, final)
    for relative in files:
        assert any(i < rename for i in flushed(events, staged / relative if relative else staged)), relative
    assert any(i > rename for i in flushed(events, final.parent)), "the folder is not flushed after the rename"


def test_a_checkpoint_reaches_the_disk_before_its_name(disk, tmp_path):
    path = save_checkpoint(tmp_path, 7, {"model": {"w": torch.ones(3)}, "step": 7})
    assert path == tmp_path / "checkpoints" / "0000007.pt" and torch.load(path, weights_only=True)["step"] == 7
    assert_durable(disk, path, [""])


@pytest.mark.parametrize("replacing", [False, True])
def test_an_export_reaches_the_disk_before_its_name(disk, tmp_path, replacing):
    """An export is a folder (config.json, model.safetensors and a model card): every file and the folder are
    flushed before the rename, also when it replaces an export already there (moved aside first, then deleted)."""
    model = XMDPT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, pose_dim=16,
                  image_dim=24, dino_tokens=5)
    if replacing:
        export(model, tmp_path / "student")
        disk.clear()
    export(model, tmp_path / "student")
    files = sorted(p.name for p in (tmp_path / "student").iterdir())
    assert files == ["README.md", "config.json", "model.safetensors"]
    assert_durable(disk, tmp_path / "student", [*files, ""])
