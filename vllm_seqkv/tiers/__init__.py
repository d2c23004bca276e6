"""Cold tiers behind one connector-facing API: ``save(block_hash, bytes)`` / ``load(block_hash)``.

One place per concept: :mod:`.tier` (the :class:`Tier` composing the parts, and the memory,
disk and Redis tiers), storage (:mod:`.storage`, :mod:`.disk`, :mod:`.redis_storage`: put /
get / delete of blobs), framing (:mod:`.blob`), lossless coders of the hot codes
(:mod:`.coders`: byte level; :mod:`.code_model`: code level, with a prior fitted by
:mod:`.cold_prior`), statistics (:mod:`.stats`), the token tier (:mod:`.token`) and the
background threads (:mod:`.background`). What a tier holds and evicts is
:class:`vllm_seqkv.plt.holdings.Holdings`, with the placement of :mod:`vllm_seqkv.plt.placement`.
No vLLM or CUDA import (transformers only for the token tier's model and the prior's forward).
"""

from vllm_seqkv.tiers.background import BackgroundSaver, JobThread
from vllm_seqkv.tiers.tier import DiskTier, MemoryTier, RedisTier, Tier
from vllm_seqkv.tiers.token import TokenTier

__all__ = ["JobThread", "BackgroundSaver", "Tier", "MemoryTier", "DiskTier", "RedisTier", "TokenTier"]
