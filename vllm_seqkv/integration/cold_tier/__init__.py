"""The cold tier behind vLLM's prefix cache, split by where each part runs.

- :mod:`.scheduler`: :class:`ColdTierScheduler`, in the scheduler process: which blocks the
  tier holds, what to load for a new request, what to save of a finished one.
- :mod:`.worker`: :class:`ColdTierWorker`, next to the pages: copies blocks between the pages
  and a tier on background threads.
- :mod:`.store`: :class:`BlockStore`, a block's record format (page bytes + exact sink rows).
- :mod:`.messages`: what the two sides send each other through vLLM each step.

:class:`vllm_seqkv.integration.connector.SeqKVColdTierConnector` is the thin facade vLLM loads.
"""

from vllm_seqkv.integration.cold_tier.messages import (
    BlockJob,
    ColdTierMetadata,
    ColdTierWorkerMetadata,
    LoadResult,
)
from vllm_seqkv.integration.cold_tier.scheduler import ColdTierScheduler, approximate_reuse_for, block_key
from vllm_seqkv.integration.cold_tier.store import BlockStore
from vllm_seqkv.integration.cold_tier.worker import ColdTierWorker, code_model_for_engine, make_tier

__all__ = ["BlockJob", "BlockStore", "ColdTierMetadata", "ColdTierScheduler", "ColdTierWorker",
           "ColdTierWorkerMetadata", "LoadResult", "approximate_reuse_for", "block_key",
           "code_model_for_engine", "make_tier"]
