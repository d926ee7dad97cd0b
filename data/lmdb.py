"""LMDB folders: one reader and one writer for the dataset images, the feature cache and the evaluation sets.

Reading: the lmdb package refuses to open one file twice in a process, and a forked DataLoader worker inherits
its parent's open environments (it may not open them again). So every reader of a file shares one read-only,
lock-free environment per process, opened on first use and found again by the file's identity; each read is
a short transaction, so none is ever open across a fork. Readers pickle without it, for spawned workers.

Writing: `LMDBWriter` writes beside the destination and renames the folder into place when it closes.
"""
from pathlib import Path

import lmdb

from data.errors import MissingEntryError, MissingFileError, OutputExistsError
from data.files import discard, publish, staging_path

MAP_SIZE = 1 << 40  # address space a writer reserves; the file only grows as needed

_ENVIRONMENTS = {}  # (device, inode) of data.mdb -> the read-only environment of this process (or its parent)


def _environment(path):
    """This process's read-only environment of the LMDB folder `path`, opened on first use."""
    stat = (Path(path) / "data.mdb").stat()
    key = (stat.st_dev, stat.st_ino)
    if key not in _ENVIRONMENTS:
        _ENVIRONMENTS[key] = lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False)
    return _ENVIRONMENTS[key]


class LMDBReader:
    """Read-only access to the LMDB folder `path`; `what` names it in errors (e.g. "feature cache")."""

    def __init__(self, path, what="LMDB", hint=""):
        self.path, self.what = Path(path), what
        if not (self.path / "data.mdb").is_file():
            raise MissingFileError(f"{what} not found: {self.path} (expected {self.path / 'data.mdb'})"
                                    + (f"; {hint}" if hint else ""))

    def get(self, key):
        """The bytes stored under `key` (str or bytes); a KeyError naming the key and the folder if absent."""
        raw = key.encode("utf-8") if isinstance(key, str) else key
        with _environment(self.path).begin() as txn:
            value = txn.get(raw)
        if value is None:
            raise MissingEntryError(f"{self.what} {self.path} has no entry {raw.decode('utf-8', 'replace')!r}")
        return value

    def keys(self):
        """Every key, decoded, in the LMDB's (sorted) order."""
        with _environment(self.path).begin() as txn:
            return [key.decode("utf-8") for key in txn.cursor().iternext(keys=True, values=False)]

    def value_sizes(self, keys):
        """The length in bytes of the value of each key (for fingerprints, without copying the values)."""
        with _environment(self.path).begin(buffers=True) as txn:
            return [len(txn.get(key.encode("utf-8"))) for key in keys]


class LMDBWriter:
    """Writes the LMDB folder `path` beside it and renames it into place on `close()`, so that a half-written
    LMDB never carries the name. Leaving a `with` block by an exception removes the partial one."""

    def __init__(self, path, overwrite=False, commit_every=1000):
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise OutputExistsError(f"{self.path} exists (pass overwrite=True / --overwrite to replace it)")
        self.staged = staging_path(self.path)
        discard(self.staged)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(str(self.staged), map_size=MAP_SIZE, readahead=False, meminit=False)
        self.txn = self.env.begin(write=True)
        self.commit_every, self.pending = commit_every, 0

    def put(self, key, value):
        """Store `value` (bytes) under `key` (str or bytes), committing every `commit_every` records."""
        self.txn.put(key.encode("utf-8") if isinstance(key, str) else key, value)
        self.pending += 1
        if self.pending == self.commit_every:
            self.txn.commit()
            self.txn = self.env.begin(write=True)
            self.pending = 0

    def close(self):
        """Commit, close, and rename the finished LMDB into place."""
        self.txn.commit()
        self.env.close()
        publish(self.staged, self.path)

    def abort(self):
        """Drop what was written and remove the partial LMDB."""
        self.txn.abort()
        self.env.close()
        discard(self.staged)

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if kind is None:
            self.close()
        else:
            self.abort()
