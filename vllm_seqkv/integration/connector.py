"""Cold tier for vLLM's prefix cache: a KV connector that keeps blocks beyond the pages.

What it does. When a request finishes, every full block of it that the cold tier does not hold
yet is copied out of vLLM's pages (the seqkv hot code, as bytes) plus, for a sequence's first
block, its exact sink rows (:class:`~.engine_codec.SinkTable`), entropy-coded losslessly
(constriction ANS: the code-level coder of :mod:`vllm_seqkv.tiers.code_model` when
``python -m vllm_seqkv.calibrate`` fitted its prior for these slots, else the byte-level
``ColdCodec``), framed with checksums (:mod:`vllm_seqkv.tiers.blob`) and stored in a
:mod:`vllm_seqkv.tiers` tier (CPU RAM, local disk with atomic writes, or Redis). vLLM's
prefix cache keeps the pages until it needs them for other requests (its LRU eviction).
When a request arrives, vLLM first takes its own prefix-cache hit; the connector reports
the blocks after that which the cold tier holds as an asynchronous load: vLLM parks the
request (``WAITING_FOR_REMOTE_KVS``) while a background thread copies the blocks back into
its pages, and schedules it once the worker reports it in ``finished_recving``. The tokens
restored this way count in the request's ``num_cached_tokens``.

Keys. A block is stored under ``blake2b(namespace | vLLM block hash)``: vLLM's hash chains
the parent hash, the block's tokens and the request's extra keys - among them
``cache_salt`` - so tenants with different salts never see each other's blocks; the
namespace folds in the model path, preset, calibration and block size, so a shared disk or
Redis tier never hands one model's blocks to another.

Faults. A blob that is missing, corrupt or truncated (checksum), or a tier that fails
(disk error, Redis down) is a miss with a warning: the loader stops that job there, the
worker reports the ids of that block and every later block of the job
(``get_block_ids_with_load_errors``, in the same step as the request's
``finished_recving``: vLLM truncates the parked request's computed tokens to the first
failed block, caches only the blocks before it and recomputes the rest;
``kv_load_failure_policy: recompute``, set by :func:`kv_transfer_config_for`), and the
scheduler does not offer that key again for ``PROBE_BACKOFF_S`` (a request whose load
failed at its first block looks up its prefix again).
NOTE: vLLM 0.32 keeps counting such recomputed tokens in ``num_cached_tokens`` (it counts
what the connector claimed at scheduling); the engine log names every failed load. A save
that fails leaves the block uncached. Disk full: the disk tier evicts its own blocks and
retries once.

Eviction. A full tier drops blocks chosen by ``cold_tier.eviction``: ``plt`` (default) hands
the tier, once per finished request, the chain of its block keys, and the learned policy of
:mod:`vllm_seqkv.plt.placement` evicts the leaf with the fewest expected reuses per byte
(never a prefix before its extensions); ``lru`` evicts the least recently used block (a
restored prefix's root counts as the most recent).

Approximate reuse (``cold_tier.approximate``, off by default). A request whose cache salt is
``salt_prefix + T`` opts in: when vLLM's prefix cache has nothing for it, the scheduler looks
up a near match of its prompt among the blocks tenant ``T``'s exactly computed requests left
in the tier (:class:`~vllm_seqkv.plt.approximate.ApproximateIndex`), within the number of
substituted tokens that the model's measured quality gate allows at ``max_kl``, and loads
those blocks like an exact hit when they are more than the exact hit. vLLM then caches them
under the request's own hashes, which fold in its own salt: requests that did not opt in
(and other tenants) never see approximate K/V, and approximate blocks are never the source
of another near match.

Where the work runs (:mod:`.cold_tier`; this class is a facade over a
:class:`~.cold_tier.ColdTierScheduler` and a :class:`~.cold_tier.ColdTierWorker`). Scheduler
side: an index of the keys the worker reported stored (plus, for disk and Redis, the tier
itself: blocks another engine stored), the load and save plans. Worker side: the tier and
the byte copies. In ``wait_for_save`` of the step after a request finishes (its blocks are
held until then: ``request_finished`` returns True) the engine thread only copies the
blocks' bytes out of the pages and releases them; a background thread
(:class:`~vllm_seqkv.tiers.BackgroundSaver`) entropy-codes and stores the copies, and a
key counts as held once the worker reports it stored. Pending copies are bounded
(``cold_tier.save_queue_bytes``): beyond that a save is dropped with a warning (a later
recompute), never a stall. At shutdown the queued saves are finished. Loads:
``start_load_kv`` only hands each step's load jobs to one loader thread
(:class:`~vllm_seqkv.tiers.JobThread`), which, per block, fetches and decodes the blob
under ``BlockStore.lock`` (the saver shares the tier) and copies its page bytes into the
parked request's blocks (no forward touches them meanwhile). The sink rows
(:class:`~.engine_codec.SinkTable`, not thread-safe) are only parsed there: the engine
thread installs them in ``get_finished`` before it reports the request finished. A request
aborted while loading keeps its blocks until then (vLLM frees a ``WAITING_FOR_REMOTE_KVS``
request's blocks only on ``finished_recving``); the loader skips its remaining blocks. At
shutdown pending loads are waited for (``SHUTDOWN_LOAD_TIMEOUT_S``).

Limits: one worker (tensor/pipeline parallel size 1), one KV-cache group, the seqkv
attention backend (pages of uint8 slots), ``hash_block_size == block_size``.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from vllm_seqkv.config import SeqKVConfig, from_additional_config
from vllm_seqkv.integration import compat
from vllm_seqkv.integration.cold_tier import (
    ColdTierMetadata,
    ColdTierScheduler,
    ColdTierWorker,
    ColdTierWorkerMetadata,
    approximate_reuse_for,
)
from vllm_seqkv.integration.compat import (
    CacheHitSource,
    KVConnectorBase_V1,
    KVConnectorFactory,
    KVConnectorRole,
    KVTransferConfig,
    extract_layer_index,
)

CONNECTOR_NAME = "SeqKVColdTierConnector"
MODULE_PATH = __name__


def kv_transfer_config_for() -> KVTransferConfig:
    """vLLM's ``kv_transfer_config`` selecting this connector (options stay in the seqkv config)."""
    return KVTransferConfig(kv_connector=CONNECTOR_NAME, kv_connector_module_path=MODULE_PATH,
                            kv_role="kv_both", kv_load_failure_policy="recompute")


def register() -> None:
    """Make ``{"kv_connector": "SeqKVColdTierConnector"}`` resolvable without a module path."""
    if not compat.connector_registered(CONNECTOR_NAME):
        KVConnectorFactory.register_connector(CONNECTOR_NAME, MODULE_PATH, "SeqKVColdTierConnector")


def namespace(vllm_config, config: SeqKVConfig) -> bytes:
    """What a block key depends on besides vLLM's block hash."""
    mc = vllm_config.model_config
    ident = "|".join(str(x) for x in (
        "seqkv-cold-1", mc.model, getattr(mc, "revision", None), config.preset, config.calibration,
        vllm_config.cache_config.block_size, mc.get_total_num_hidden_layers(),
        mc.get_total_num_kv_heads(), mc.get_head_size()))
    return hashlib.blake2b(ident.encode(), digest_size=16).digest()


class SeqKVColdTierConnector(KVConnectorBase_V1):
    """vLLM's KV-connector API over the cold tier: scheduler calls go to ``scheduler``, worker
    calls to ``worker`` (built in ``register_kv_caches``, once the pages exist)."""

    _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.config = from_additional_config(vllm_config.additional_config)
        if self.config.cold_tier is None or not self.config.enabled:
            raise ValueError("SeqKVColdTierConnector needs --kv-cache-backend seqkv and a "
                             "'cold_tier' in additional_config['seqkv']")
        self.cold = self.config.cold_tier
        par = vllm_config.parallel_config
        if par.tensor_parallel_size * par.pipeline_parallel_size != 1:
            raise NotImplementedError("seqkv cold tier: tensor/pipeline parallel size must be 1")
        cache = vllm_config.cache_config
        self.block_size = cache.block_size
        hbs = getattr(cache, "hash_block_size", None)
        if hbs not in (None, self.block_size):
            raise NotImplementedError(f"seqkv cold tier: hash_block_size {hbs} != block_size "
                                      f"{self.block_size}")
        if self._kv_transfer_config.kv_load_failure_policy != "recompute":
            raise ValueError("seqkv cold tier: set kv_load_failure_policy 'recompute' in "
                             "--kv-transfer-config (a corrupt blob must be recomputed)")
        self._cache_hit_source = {"cpu": CacheHitSource.HOST, "disk": CacheHitSource.DISK}.get(
            self.cold.kind, CacheHitSource.EXTERNAL_UNSPECIFIED)
        approx, allowed, probe = None, 0, None
        if role == KVConnectorRole.SCHEDULER:
            approx, allowed = approximate_reuse_for(vllm_config, self.cold.approximate, self.block_size)
            if self.cold.kind == "redis":
                from vllm_seqkv.tiers import RedisTier  # shared across nodes: ask the server

                probe = RedisTier(self.cold.url)
        self.scheduler = ColdTierScheduler(self.cold, namespace(vllm_config, self.config), self.block_size,
                                           approx, allowed, probe)
        self.worker: ColdTierWorker | None = None

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped save is a later miss

    # ==== scheduler side ====
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> ColdTierMetadata:
        return self.scheduler.build_connector_meta(scheduler_output)

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler.request_finished(request, block_ids)

    def update_connector_output(self, connector_output) -> None:
        self.scheduler.update_connector_output(connector_output)

    # ==== worker side ====
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        from vllm_seqkv.integration.engine_codec import active_engine_codec

        layers = sorted(kv_caches, key=extract_layer_index)
        pages = [t.view(torch.uint8) if t.dtype != torch.uint8 else t for t in
                 (kv_caches[name] for name in layers)]
        hidden = self._vllm_config.model_config.get_hidden_size()
        self.worker = ColdTierWorker.for_pages(self.cold, pages, active_engine_codec(), hidden)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        if self.worker is not None:
            self.worker.start_load_kv(self._connector_metadata)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return

    def wait_for_save(self):
        if self.worker is not None:
            self.worker.wait_for_save(self._connector_metadata)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self.worker is None:
            return None, None
        return self.worker.get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.get_block_ids_with_load_errors() if self.worker is not None else set()

    def build_connector_worker_meta(self) -> ColdTierWorkerMetadata | None:
        return self.worker.build_connector_worker_meta() if self.worker is not None else None

    def get_kv_connector_stats(self):
        """The worker's counter increments and tier gauges, or on the scheduler side
        approximate reuse's counter increments (see :mod:`.connector_metrics`)."""
        if self.worker is not None:
            return self.worker.get_kv_connector_stats()
        return self.scheduler.get_kv_connector_stats()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None):
        from vllm_seqkv.integration.connector_metrics import ColdTierStats

        return ColdTierStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        from vllm_seqkv.integration.connector_metrics import ColdTierPromMetrics

        return ColdTierPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self):
        if self.worker is not None:
            self.worker.shutdown()
