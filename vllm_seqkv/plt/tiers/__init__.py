"""Cold tiers behind one connector-facing API: ``save(block_hash, bytes)`` / ``load(block_hash)``."""

from vllm_seqkv.plt.tiers.background import BackgroundSaver, JobThread
from vllm_seqkv.plt.tiers.base import MemoryTier, Tier
from vllm_seqkv.plt.tiers.disk import DiskTier
from vllm_seqkv.plt.tiers.token import TokenTier


def RedisTier(*args, **kwargs):  # lazy: `redis` is only needed when used
    from vllm_seqkv.plt.tiers.redis_tier import RedisTier as _R

    return _R(*args, **kwargs)


__all__ = ["JobThread", "BackgroundSaver", "Tier", "MemoryTier", "DiskTier", "RedisTier", "TokenTier"]
