"""data/lmdb.py and data/files.py: one LMDB reader, safe in forked and spawned DataLoader workers; writers and
atomic writes that never leave a half-written file under the destination's name."""
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from data.files import atomic_path
from data.lmdb import LMDBReader, LMDBWriter


def write(path, n=20, tag=b""):
    with LMDBWriter(path, overwrite=True, commit_every=7) as writer:
        for i in range(n):
            writer.put(f"k{i:02d}", tag + str(i).encode())


class Values(Dataset):
    def __init__(self, reader):
        self.reader = reader

    def __len__(self):
        return 20

    def __getitem__(self, i):
        return int(self.reader.get(f"k{i:02d}"))


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_reader_in_workers_after_the_parent_read(tmp_path, start):
    """The parent reads first (so the file is open in it when the workers fork); every worker reads too."""
    write(tmp_path / "db")
    reader = LMDBReader(tmp_path / "db")
    assert reader.get("k03") == b"3"
    loader = DataLoader(Values(reader), batch_size=4, num_workers=2, multiprocessing_context=start)
    assert torch.cat(list(loader)).tolist() == list(range(20))
    assert reader.keys() == [f"k{i:02d}" for i in range(20)]
    assert reader.value_sizes(["k03", "k13"]) == [1, 2]


def test_reader_errors_name_the_folder_and_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="feature cache not found: .*nothing.*data.mdb.*; run this"):
        LMDBReader(tmp_path / "nothing", "feature cache", hint="run this")
    write(tmp_path / "db")
    with pytest.raises(KeyError, match=r"LMDB .*db has no entry 'absent'"):
        LMDBReader(tmp_path / "db").get("absent")


def test_writer_publishes_only_when_complete(tmp_path):
    """A writer that fails leaves neither a partial LMDB nor a changed old one; a complete one replaces it."""
    write(tmp_path / "db")
    with pytest.raises(RuntimeError):
        with LMDBWriter(tmp_path / "db", overwrite=True) as writer:
            writer.put("k00", b"new")
            raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db"]
    write(tmp_path / "db", tag=b"v2-")
    assert LMDBReader(tmp_path / "db").get("k00") == b"v2-0"
    with pytest.raises(FileExistsError, match="overwrite"):
        LMDBWriter(tmp_path / "db")


def test_atomic_path_for_files_and_folders(tmp_path):
    target = tmp_path / "a" / "state.pt"
    with atomic_path(target) as staged:
        staged.write_text("one")
        assert not target.exists()
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as staged:
            staged.write_text("half")
            raise KeyboardInterrupt
    assert target.read_text() == "one" and sorted(p.name for p in target.parent.iterdir()) == ["state.pt"]
    folder = tmp_path / "export"
    for content in ("old", "new"):
        with atomic_path(folder) as staged:
            staged.mkdir()
            (staged / "weights").write_text(content)
    assert (folder / "weights").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["a", "export"]
