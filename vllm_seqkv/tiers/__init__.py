"""Cold tiers behind one connector-facing API: ``save(block_hash, bytes)`` / ``load(block_hash)``.

Storage (memory, disk, Redis, the token tier), framing (:mod:`.blob`), lossless coders of the
hot codes (:mod:`.coders`: byte level; :mod:`.code_model`: code level, with a prior fitted by
:mod:`.cold_prior`) and the background threads. Eviction is delegated to a placement from
:mod:`vllm_seqkv.plt.placement`. No vLLM or CUDA import (transformers only for the token tier's
model and the prior's forward).
"""

from vllm_seqkv.tiers.background import BackgroundSaver, JobThread
from vllm_seqkv.tiers.base import MemoryTier, Tier
from vllm_seqkv.tiers.disk import DiskTier
from vllm_seqkv.tiers.token import TokenTier


def RedisTier(*args, **kwargs):  # lazy: `redis` is only needed when used
    from vllm_seqkv.tiers.redis_tier import RedisTier as _R

    return _R(*args, **kwargs)


__all__ = ["JobThread", "BackgroundSaver", "Tier", "MemoryTier", "DiskTier", "RedisTier", "TokenTier"]
