"""Token-only tier: keep the token ids, arithmetic-coded under the model itself.

Restore = decode the ids, then the engine re-prefills them (the KV is recomputed). The
stored bytes are little-endian int32 token ids, so the tier keeps the connector API
(``save(key, bytes)`` / ``load(key)``); :meth:`save_tokens` / :meth:`load_tokens` take lists.
"""

from __future__ import annotations

import numpy as np

from vllm_seqkv.tiers.storage import MemoryStorage
from vllm_seqkv.tiers.tier import Tier


class _IdsCodec:
    def __init__(self, coder):
        self.coder = coder
        self.codec_id = coder.codec_id
        self.tag = coder.tag

    def encode(self, data: bytes) -> bytes:
        return self.coder.encode(np.frombuffer(data, "<i4").tolist())

    def decode(self, payload: bytes, raw_len: int) -> bytes:
        return np.asarray(self.coder.decode(payload, raw_len // 4), "<i4").tobytes()


class TokenTier(Tier):
    """Token ids in CPU RAM, coded by ``coder`` (:class:`~.coders.TokenCoder`)."""

    def __init__(self, coder, capacity_bytes: int | None = None):
        super().__init__(MemoryStorage(), _IdsCodec(coder), capacity_bytes, name="token")

    def save_tokens(self, key, ids) -> bool:
        return self.save(key, np.asarray(ids, "<i4").tobytes())

    def load_tokens(self, key) -> list[int] | None:
        raw = self.load(key)
        return None if raw is None else np.frombuffer(raw, "<i4").tolist()
