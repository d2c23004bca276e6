"""What a cold tier holds and which block it evicts next, apart from where the blobs live.

:class:`Holdings` records each held key's stored (framed) and raw bytes in least-recently-used
order, keeps their totals current, remembers the keys dropped since the caller last asked,
and names the next victim: the least recently used key, or what a placement chooses
(:class:`~vllm_seqkv.plt.placement.LearnedEviction`, or any object with ``adopt(key)``,
``victim(held, exclude) -> key | None`` and ``forget(key)``). It deletes nothing: the tier
deletes the victim's blob, then drops the key here.

Verbs: ``hold`` / ``drop`` (a key enters / leaves), ``touch`` (used: most recent),
``victim``; ``take_dropped`` hands the dropped keys over once. Keys are bytes.
"""

from __future__ import annotations

from collections import OrderedDict


class Holdings:
    def __init__(self, placement=None):
        self.placement = placement
        self._sizes: OrderedDict[bytes, int] = OrderedDict()  # key -> stored bytes, LRU first
        self._raw: dict[bytes, int] = {}
        self._nbytes = self._raw_nbytes = 0  # NOTE: the sums of _sizes / _raw, kept current
        self._dropped: list[bytes] = []

    def set_placement(self, placement) -> None:
        """Let ``placement`` choose victims from now on (it adopts the keys held now)."""
        self.placement = placement
        for key in self._sizes:
            placement.adopt(key)

    def hold(self, key: bytes, size: int, raw_len: int | None = None) -> None:
        """``key`` is held (most recently used) in ``size`` stored bytes, ``raw_len`` raw
        bytes when known (a blob found on disk at start-up: unknown); replaces a previous size."""
        self._forget_size(key)
        self._sizes[key] = size
        if self.placement is not None:
            self.placement.adopt(key)
        self._nbytes += size
        if raw_len is not None:
            self._raw[key] = raw_len
            self._raw_nbytes += raw_len

    def drop(self, key: bytes) -> None:
        """``key`` is no longer held (evicted, corrupt or deleted); no-op when it was not."""
        if key in self._sizes:
            self._dropped.append(key)
            if self.placement is not None:
                self.placement.forget(key)
        self._forget_size(key)

    def _forget_size(self, key: bytes) -> None:
        self._nbytes -= self._sizes.pop(key, 0)
        self._raw_nbytes -= self._raw.pop(key, 0)

    def touch(self, key: bytes) -> None:
        """Mark ``key`` most recently used (no-op when not held)."""
        if key in self._sizes:
            self._sizes.move_to_end(key)

    def victim(self, exclude: bytes | None = None) -> bytes | None:
        """The key to evict next (never ``exclude``), or None when no other key is held."""
        if self.placement is not None:
            return self.placement.victim(self._sizes, exclude)
        return next((k for k in self._sizes if k != exclude), None)

    def take_dropped(self) -> list[bytes]:
        """Keys dropped since the last call; clears."""
        out, self._dropped = self._dropped, []
        return out

    def size(self, key: bytes) -> int | None:
        """Stored bytes held for ``key`` (the framed blob), or None if not held."""
        return self._sizes.get(key)

    def keys(self) -> list[bytes]:
        """The held keys, least recently used first."""
        return list(self._sizes)

    def __contains__(self, key: bytes) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    @property
    def raw_nbytes(self) -> int:
        return self._raw_nbytes
