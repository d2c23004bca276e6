"""Local-disk storage: one file per block, written atomically.

Write path: temp file ``.tmp-*`` in the same directory -> write -> fsync -> ``os.replace`` ->
fsync of the directory. A writer killed at any point leaves at most a ``.tmp-*`` file, which
``get`` never reads and the next :class:`DiskStorage` on that directory deletes. A final-named
file is still verified by the tier (header checksum + digest of the decoded bytes) on every load.

Disk full (``ENOSPC``/``EDQUOT``) raises :class:`~.storage.StorageFull`: the tier evicts and
retries once.
"""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

from vllm_seqkv.tiers.storage import Storage, StorageFull

_FULL = {errno.ENOSPC, errno.EDQUOT}
_os_write = os.write  # module-level so tests can simulate a full disk


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.parent / f".tmp-{os.getpid()}-{uuid.uuid4().hex}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = _os_write(fd, view[:1 << 20])
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def blob_path(root, key: bytes) -> Path:
    """The file of ``key``'s blob under ``root``."""
    return Path(root) / f"{key.hex()}.blob"


class DiskStorage(Storage):
    name = "disk"

    def __init__(self, root):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for p in self.root.glob(".tmp-*"):  # leftovers of killed writers: never trusted
            p.unlink(missing_ok=True)

    def path(self, key: bytes) -> Path:
        return blob_path(self.root, key)

    def put(self, key, blob):
        try:
            atomic_write(self.path(key), blob)
        except OSError as e:
            if e.errno in _FULL:
                raise StorageFull(e.errno, e.strerror) from e
            raise

    def get(self, key):
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, key):
        self.path(key).unlink(missing_ok=True)

    def inventory(self) -> list[tuple[bytes, int]]:
        out = []
        for p in sorted(self.root.glob("*.blob"), key=lambda p: p.stat().st_mtime):
            try:
                out.append((bytes.fromhex(p.stem), p.stat().st_size))
            except ValueError:
                continue
        return out
