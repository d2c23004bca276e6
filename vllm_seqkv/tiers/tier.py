"""A cold tier: what the KV connector calls, ``save(key, bytes) -> bool`` / ``load(key) -> bytes | None``.

A :class:`Tier` composes four parts, each in one place:

- ``storage`` (:mod:`.storage`, :mod:`.disk`, :mod:`.redis_storage`): ``put`` / ``get`` /
  ``delete`` of framed blobs;
- ``coding`` (:class:`~.blob.BlobCodec`): a lossless coder framed per block;
- ``held`` (:class:`~vllm_seqkv.plt.holdings.Holdings`): the held keys and their sizes, LRU
  order, the placement that picks victims;
- ``stats`` (:class:`~.stats.TierStats`): counters.

The tier adds the capacity (evicting to make room), the error contract, and the split of a
save and a load into a lock-free coding step and a short bookkeeping step (background threads).

Contract: ``load`` never returns bytes other than those saved under that key - any
corruption, truncation, foreign blob or backend failure is a miss (``None``) with a warning,
never an exception to the caller. ``save`` returns False (and warns) when it could not store.
"""

from __future__ import annotations

import logging
import time

from vllm_seqkv.plt.holdings import Holdings
from vllm_seqkv.tiers.blob import BlobCodec, key_bytes
from vllm_seqkv.tiers.coders import RawCodec
from vllm_seqkv.tiers.disk import DiskStorage
from vllm_seqkv.tiers.stats import TierStats
from vllm_seqkv.tiers.storage import MemoryStorage, Storage, StorageFull

log = logging.getLogger("vllm_seqkv.plt")


class Tier:
    """``storage`` of blobs coded by ``codec`` (default: raw bytes), at most ``capacity_bytes``
    stored bytes (None: unbounded). Blobs the storage already holds (a disk a previous engine
    filled) are held from the start, oldest first. Keys: bytes, int or str."""

    def __init__(self, storage: Storage, codec=None, capacity_bytes: int | None = None,
                 name: str | None = None):
        self.storage = storage
        self.coding = BlobCodec(codec or RawCodec())
        self.capacity_bytes = capacity_bytes
        self.held = Holdings()
        self.stats = TierStats()
        self.name = name or storage.name
        for key, size in storage.inventory():
            self.held.hold(key, size)

    # ---- save ------------------------------------------------------------------------------
    def save(self, key, data: bytes) -> bool:
        """Encode and store; False (with a warning) when it could not."""
        k = key_bytes(key)
        blob = self.encode_block(k, data)
        return blob is not None and self.save_encoded(k, blob, len(data))

    def encode_block(self, key, data: bytes) -> bytes | None:
        """First part of :meth:`save`: the framed blob of ``data`` (None, with a warning, if
        the codec refuses it).

        NOTE: touches no tier state but a counter, so a background saver may call it without
        the tier's lock.
        """
        k = key_bytes(key)
        try:
            return self.coding.encode(k, bytes(data))
        except Exception as e:  # a codec that cannot take these bytes
            log.warning("%s: cannot encode block %s: %s", self.name, k.hex()[:16], e)
            self.stats.errors += 1
            return None

    def save_encoded(self, key, blob: bytes, raw_len: int) -> bool:
        """Second part of :meth:`save`: store a blob of :meth:`encode_block`, evicting to make room."""
        t0 = time.perf_counter()
        k = key_bytes(key)
        if self.capacity_bytes is not None and len(blob) > self.capacity_bytes:
            return False
        self._make_room(len(blob), exclude=k)
        ok = self._put(k, blob)
        if ok:
            self.held.hold(k, len(blob), raw_len)
            self.stats.saves += 1
        self.stats.save_s += time.perf_counter() - t0
        return ok

    def _put(self, k: bytes, blob: bytes) -> bool:
        """Put the blob; on a full storage evict twice its size and retry once."""
        for attempt in range(2):
            try:
                self.storage.put(k, blob)
                return True
            except StorageFull:
                if attempt == 0:
                    log.warning("%s: full while saving %s; evicting", self.name, k.hex()[:16])
                    freed = 0
                    while freed < 2 * len(blob):
                        size = self.evict(exclude=k)
                        if size is None:
                            break
                        freed += size
                    continue
                log.warning("%s: save of %s failed: still full after evicting", self.name,
                            k.hex()[:16])
            except Exception as e:
                log.warning("%s: save of %s failed: %s", self.name, k.hex()[:16], e)
            self.stats.errors += 1
            return False
        return False

    def _make_room(self, need: int, exclude: bytes | None = None) -> None:
        if self.capacity_bytes is None:
            return
        while self.held.nbytes - (self.held.size(exclude) or 0) + need > self.capacity_bytes:
            if self.evict(exclude) is None:
                break

    # ---- load ------------------------------------------------------------------------------
    def load(self, key) -> bytes | None:
        """The bytes saved under ``key``, or None (a miss, warned when not just absent)."""
        t0 = time.perf_counter()
        k = key_bytes(key)
        blob = self.fetch(k)
        out = self.decode_block(k, blob)
        self.finish_load(k, blob, out, time.perf_counter() - t0)
        return out

    def fetch(self, key) -> bytes | None:
        """First part of :meth:`load`: the stored blob, or None (absent; a backend failure
        is warned)."""
        k = key_bytes(key)
        self.stats.loads += 1
        try:
            return self.storage.get(k)
        except Exception as e:
            log.warning("%s: load of %s failed (%s); treating as a miss", self.name, k.hex()[:16], e)
            self.stats.errors += 1
            return None

    def decode_block(self, key, blob: bytes | None) -> bytes | None:
        """Second part of :meth:`load`: the bytes of a :meth:`fetch` blob, or None (absent,
        or corrupt: warned; :meth:`finish_load` drops it).

        NOTE: touches no tier state, so a background loader may call it without the tier's
        lock (the entropy decode is the slow part of a load).
        """
        if blob is None:
            return None
        k = key_bytes(key)
        try:
            return self.coding.decode(k, blob)
        except Exception as e:
            log.warning("%s: block %s is corrupt (%s); dropping it, recompute",
                        self.name, k.hex()[:16], e)
            return None

    def finish_load(self, key, blob: bytes | None, out: bytes | None, seconds: float = 0.0) -> None:
        """Last part of :meth:`load`: count it, drop a corrupt blob, mark a hit recently used."""
        k = key_bytes(key)
        if blob is not None and out is None:  # corrupt
            self.stats.errors += 1
            self.delete(k)
        if out is None:
            self.stats.misses += 1
        else:
            self.stats.hits += 1
            self.held.touch(k)
        self.stats.load_s += seconds

    # ---- holdings --------------------------------------------------------------------------
    def delete(self, key) -> None:
        """Remove ``key``'s blob (a backend failure is warned, the key is dropped anyway)."""
        k = key_bytes(key)
        self.held.drop(k)
        try:
            self.storage.delete(k)
        except Exception as e:
            log.warning("%s: delete of %s failed: %s", self.name, k.hex()[:16], e)

    def touch(self, key) -> None:
        """Mark ``key`` most recently used, without loading it."""
        self.held.touch(key_bytes(key))

    def evict(self, exclude=None) -> int | None:
        """Delete the victim the holdings name (never ``exclude``): the stored bytes freed, or
        None when there is nothing else to evict."""
        k = self.held.victim(None if exclude is None else key_bytes(exclude))
        if k is None:
            return None
        size = self.held.size(k) or 0
        self.delete(k)
        self.stats.evictions += 1
        return size

    def __contains__(self, key) -> bool:
        k = key_bytes(key)
        if self.storage.shared:  # other writers, TTLs: ask the storage
            try:
                return self.storage.exists(k)
            except Exception:
                return False
        return k in self.held

    def __len__(self) -> int:
        return len(self.held)


class MemoryTier(Tier):
    """CPU RAM: coded blobs in a dict."""

    def __init__(self, codec=None, capacity_bytes: int | None = None):
        super().__init__(MemoryStorage(), codec, capacity_bytes)


class DiskTier(Tier):
    """Local disk under ``root``, one file per block (atomic writes; see :mod:`.disk`)."""

    def __init__(self, root, codec=None, capacity_bytes: int | None = None):
        super().__init__(DiskStorage(root), codec, capacity_bytes)


class RedisTier(Tier):
    """Redis/Valkey at ``url`` (server down: a miss with a warning, never an exception)."""

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", codec=None,
                 capacity_bytes: int | None = None, prefix: bytes = b"seqkv:",
                 ttl_s: int | None = None, timeout_s: float = 0.5, client=None):
        from vllm_seqkv.tiers.redis_storage import RedisStorage

        super().__init__(RedisStorage(url, prefix, ttl_s, timeout_s, client), codec, capacity_bytes)
