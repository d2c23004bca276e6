"""Tier API a KV connector calls: ``save(block_hash, bytes) -> bool``, ``load(block_hash) -> bytes | None``.

Every tier stores framed blobs (:mod:`vllm_seqkv.tiers.blob`) of the entropy-coded bytes.
Contract: ``load`` never returns bytes other than those saved under that key - any
corruption, truncation, foreign blob or backend failure is a miss (``None``) with a warning,
never an exception to the caller. ``save`` returns False (and warns) when it could not store.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from vllm_seqkv.tiers import blob as _blob
from vllm_seqkv.tiers.coders import RawCodec

log = logging.getLogger("vllm_seqkv.plt")


class Tier(ABC):
    """A keyed blob store with a byte capacity and in-tier eviction.

    Eviction: least-recently-used, or what :meth:`set_placement` installs (an object with
    ``adopt(key)``, ``victim(held, exclude) -> key | None`` and ``forget(key)``, e.g.
    :class:`~vllm_seqkv.plt.placement.LearnedEviction`).
    """

    name = "tier"

    def __init__(self, codec=None, capacity_bytes: int | None = None):
        self.codec = codec or RawCodec()
        self.capacity_bytes = capacity_bytes
        self.placement = None
        self._sizes: OrderedDict[bytes, int] = OrderedDict()  # key -> stored bytes, LRU order
        self._raw: dict[bytes, int] = {}
        self._nbytes = self._raw_nbytes = 0  # NOTE: the sums of _sizes / _raw, kept current
        self.stats = {"saves": 0, "loads": 0, "hits": 0, "misses": 0, "errors": 0,
                      "evictions": 0, "load_s": 0.0, "save_s": 0.0}
        self._dropped: list[bytes] = []  # keys no longer held (evicted, corrupt, deleted)

    # ---- backend ---------------------------------------------------------------------------
    @abstractmethod
    def _put(self, k: bytes, blob: bytes) -> None: ...

    @abstractmethod
    def _get(self, k: bytes) -> bytes | None: ...

    @abstractmethod
    def _del(self, k: bytes) -> None: ...

    # ---- public API ------------------------------------------------------------------------
    def encode(self, key, data: bytes) -> bytes:
        return _blob.pack(key, self.codec.codec_id, self.codec.tag, data,
                          self.codec.encode(data))

    def decode(self, key, blob: bytes) -> bytes:
        raw_len, payload, digest = _blob.unpack(blob, key, self.codec.codec_id, self.codec.tag)
        return _blob.check_raw(self.codec.decode(payload, raw_len), raw_len, digest)

    def save(self, key, data: bytes) -> bool:
        """Encode and store; False (with a warning) when it could not."""
        k = _blob.key_bytes(key)
        blob = self.encode_block(k, data)
        return blob is not None and self.save_encoded(k, blob, len(data))

    def encode_block(self, key, data: bytes) -> bytes | None:
        """The framed blob of ``data`` (None, with a warning, if the codec refuses it).

        NOTE: touches no tier state, so a background saver may call it without the tier's lock.
        """
        k = _blob.key_bytes(key)
        try:
            return self.encode(k, bytes(data))
        except Exception as e:  # a codec that cannot take these bytes
            log.warning("%s: cannot encode block %s: %s", self.name, k.hex()[:16], e)
            self.stats["errors"] += 1
            return None

    def save_encoded(self, key, blob: bytes, raw_len: int) -> bool:
        """Store a blob of :meth:`encode_block`, evicting to make room."""
        t0 = time.perf_counter()
        k = _blob.key_bytes(key)
        if self.capacity_bytes is not None and len(blob) > self.capacity_bytes:
            return False
        self._make_room(len(blob), exclude=k)
        ok = self._store(k, blob)
        if ok:
            self._hold(k, len(blob), raw_len)
            self.stats["saves"] += 1
        self.stats["save_s"] += time.perf_counter() - t0
        return ok

    def _store(self, k: bytes, blob: bytes) -> bool:
        try:
            self._put(k, blob)
            return True
        except Exception as e:
            log.warning("%s: save of %s failed: %s", self.name, k.hex()[:16], e)
            self.stats["errors"] += 1
            return False

    def load(self, key) -> bytes | None:
        """The bytes saved under ``key``, or None (a miss, warned when not just absent)."""
        t0 = time.perf_counter()
        k = _blob.key_bytes(key)
        blob = self.fetch(k)
        out = self.decode_block(k, blob)
        self.finish_load(k, blob, out, time.perf_counter() - t0)
        return out

    def fetch(self, key) -> bytes | None:
        """First part of :meth:`load`: the stored blob, or None (absent; a backend failure
        is warned)."""
        k = _blob.key_bytes(key)
        self.stats["loads"] += 1
        try:
            return self._get(k)
        except Exception as e:
            log.warning("%s: load of %s failed (%s); treating as a miss", self.name, k.hex()[:16], e)
            self.stats["errors"] += 1
            return None

    def decode_block(self, key, blob: bytes | None) -> bytes | None:
        """Second part of :meth:`load`: the bytes of a :meth:`fetch` blob, or None (absent,
        or corrupt: warned; :meth:`finish_load` drops it).

        NOTE: touches no tier state, so a background loader may call it without the tier's
        lock (the entropy decode is the slow part of a load).
        """
        if blob is None:
            return None
        k = _blob.key_bytes(key)
        try:
            return self.decode(k, blob)
        except Exception as e:
            log.warning("%s: block %s is corrupt (%s); dropping it, recompute",
                        self.name, k.hex()[:16], e)
            return None

    def finish_load(self, key, blob: bytes | None, out: bytes | None, seconds: float = 0.0) -> None:
        """Last part of :meth:`load`: count it, drop a corrupt blob, mark a hit recently used."""
        k = _blob.key_bytes(key)
        if blob is not None and out is None:  # corrupt
            self.stats["errors"] += 1
            self.delete(k)
        if out is None:
            self.stats["misses"] += 1
        else:
            self.stats["hits"] += 1
            if k in self._sizes:
                self._sizes.move_to_end(k)
        self.stats["load_s"] += seconds

    def delete(self, key) -> None:
        k = _blob.key_bytes(key)
        if k in self._sizes:
            self._dropped.append(k)
            if self.placement is not None:
                self.placement.forget(k)
        self._release(k)
        try:
            self._del(k)
        except Exception as e:
            log.warning("%s: delete of %s failed: %s", self.name, k.hex()[:16], e)

    def _hold(self, k: bytes, size: int, raw_len: int | None = None) -> None:
        """Record ``k`` as held (most recently used), ``size`` stored bytes."""
        self._release(k)
        self._sizes[k] = size
        if self.placement is not None:
            self.placement.adopt(k)
        self._nbytes += size
        if raw_len is not None:
            self._raw[k] = raw_len
            self._raw_nbytes += raw_len

    def _release(self, k: bytes) -> None:
        self._nbytes -= self._sizes.pop(k, 0)
        self._raw_nbytes -= self._raw.pop(k, 0)

    def touch(self, key) -> None:
        """Mark ``key`` most recently used (LRU order), without loading it."""
        k = _blob.key_bytes(key)
        if k in self._sizes:
            self._sizes.move_to_end(k)

    def stored_bytes(self, key) -> int | None:
        """Bytes held for ``key`` (the framed blob), or None if not held."""
        return self._sizes.get(_blob.key_bytes(key))

    def take_dropped(self) -> list[bytes]:
        """Keys dropped since the last call (evicted, found corrupt or deleted); clears."""
        out, self._dropped = self._dropped, []
        return out

    def __contains__(self, key) -> bool:
        return _blob.key_bytes(key) in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    @property
    def raw_nbytes(self) -> int:
        return self._raw_nbytes

    # ---- eviction --------------------------------------------------------------------------
    def set_placement(self, placement) -> None:
        """Let ``placement`` choose victims from now on (it adopts the keys held now)."""
        self.placement = placement
        for k in self._sizes:
            placement.adopt(k)

    def victim(self, exclude: bytes | None = None) -> bytes | None:
        if self.placement is not None:
            return self.placement.victim(self._sizes, exclude)
        return next((k for k in self._sizes if k != exclude), None)

    def evict_one(self, exclude: bytes | None = None) -> bytes | None:
        k = self.victim(exclude)
        if k is not None:
            self.delete(k)
            self.stats["evictions"] += 1
        return k

    def _make_room(self, need: int, exclude: bytes | None = None) -> None:
        if self.capacity_bytes is None:
            return
        have = self.nbytes - self._sizes.get(exclude, 0)
        while have + need > self.capacity_bytes:
            k = self.victim(exclude)
            if k is None:
                break
            have -= self._sizes.get(k, 0)
            self.delete(k)
            self.stats["evictions"] += 1


class MemoryTier(Tier):
    """CPU-RAM tier: entropy-coded blobs in a dict."""

    name = "cpu"

    def __init__(self, codec=None, capacity_bytes: int | None = None):
        super().__init__(codec, capacity_bytes)
        self._data: dict[bytes, bytes] = {}

    def _put(self, k, blob):
        self._data[k] = blob

    def _get(self, k):
        return self._data.get(k)

    def _del(self, k):
        self._data.pop(k, None)
