"""Local-disk tier: one file per block, written atomically.

Write path: temp file ``.tmp-*`` in the same directory -> write -> fsync -> ``os.replace`` ->
fsync of the directory. A writer killed at any point leaves at most a ``.tmp-*`` file, which
``load`` never reads and the next :class:`DiskTier` on that directory deletes. A final-named
file is still verified (header checksum + digest of the decoded bytes) on every load.

Disk full (``ENOSPC``/``EDQUOT``): evict blobs of this tier and retry once; if it still fails,
``save`` returns False with a warning. Never raises to the caller.
"""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

from vllm_seqkv.tiers.base import Tier, log

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


class DiskTier(Tier):
    name = "disk"

    def __init__(self, root, codec=None, capacity_bytes: int | None = None):
        super().__init__(codec, capacity_bytes)
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for p in self.root.glob(".tmp-*"):  # leftovers of killed writers: never trusted
            p.unlink(missing_ok=True)
        for p in sorted(self.root.glob("*.blob"), key=lambda p: p.stat().st_mtime):
            try:
                self._hold(bytes.fromhex(p.stem), p.stat().st_size)
            except ValueError:
                continue

    def path(self, k: bytes) -> Path:
        return self.root / f"{k.hex()}.blob"

    def _put(self, k, blob):
        atomic_write(self.path(k), blob)

    def _store(self, k: bytes, blob: bytes) -> bool:
        for attempt in range(2):
            try:
                self._put(k, blob)
                return True
            except OSError as e:
                if e.errno in _FULL and attempt == 0:
                    freed = 0
                    log.warning("disk: full while saving %s; evicting", k.hex()[:16])
                    while freed < 2 * len(blob):
                        v = self.victim(exclude=k)
                        if v is None:
                            break
                        freed += self._sizes.get(v, 0)
                        self.delete(v)
                        self.stats["evictions"] += 1
                    continue
                log.warning("disk: save of %s failed: %s", k.hex()[:16], e)
                self.stats["errors"] += 1
                return False
        return False

    def _get(self, k):
        try:
            return self.path(k).read_bytes()
        except FileNotFoundError:
            return None

    def _del(self, k):
        self.path(k).unlink(missing_ok=True)
