"""Where a tier's framed blobs live: ``put`` / ``get`` / ``delete`` of bytes under a key.

A storage knows nothing of coding, framing, capacity, eviction or statistics (the
:class:`~vllm_seqkv.tiers.tier.Tier` over it does). Its verbs raise on a backend failure; the
tier turns that into a warning and a miss. Keys are bytes (:func:`~.blob.key_bytes`).
Backends: :class:`MemoryStorage` here, :class:`~.disk.DiskStorage`,
:class:`~.redis_storage.RedisStorage`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class StorageFull(OSError):
    """The backend has no room (disk full, quota exceeded): the tier evicts and retries once."""


class Storage(ABC):
    """Blobs by key. ``shared``: other writers (other engines, TTLs) change it, so whether a
    key is there is asked with :meth:`exists`, not read from the tier's own bookkeeping."""

    name = "storage"
    shared = False

    @abstractmethod
    def put(self, key: bytes, blob: bytes) -> None: ...

    @abstractmethod
    def get(self, key: bytes) -> bytes | None:
        """The blob under ``key``; None when there is none."""

    @abstractmethod
    def delete(self, key: bytes) -> None:
        """Remove ``key``'s blob (no error when there is none)."""

    def exists(self, key: bytes) -> bool:
        return self.get(key) is not None

    def inventory(self) -> list[tuple[bytes, int]]:
        """(key, stored bytes) of the blobs there before this process opened it, oldest first."""
        return []


class MemoryStorage(Storage):
    """CPU RAM: blobs in a dict."""

    name = "cpu"

    def __init__(self):
        self.blobs: dict[bytes, bytes] = {}

    def put(self, key, blob):
        self.blobs[key] = blob

    def get(self, key):
        return self.blobs.get(key)

    def delete(self, key):
        self.blobs.pop(key, None)
