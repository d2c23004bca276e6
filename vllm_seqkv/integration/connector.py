"""Cold tier for vLLM's prefix cache: a KV connector that keeps blocks beyond vLLM's pages.

A finished request's full blocks that the tier lacks are copied out of the pages (the seqkv
hot code as bytes, plus a sequence's exact sink rows), coded losslessly, framed with checksums
and stored in a :mod:`vllm_seqkv.tiers` tier (CPU RAM, local disk or Redis). A new request's
blocks after vLLM's own prefix hit that the tier holds are loaded asynchronously: vLLM parks
the request (``WAITING_FOR_REMOTE_KVS``) until a background thread has copied them back into
its pages; they count in the request's ``num_cached_tokens``.

Invariants: a block's key folds in vLLM's block hash (hence the cache salt: tenants never see
each other's blocks) and a :func:`namespace` (model, preset, calibration, shapes: a shared
tier never hands one model's blocks to another). A missing, corrupt or unreadable block is a
miss with a warning, recomputed by vLLM (``kv_load_failure_policy: recompute``), never wrong
K/V.

This module is the facade vLLM loads; the work is in :mod:`.cold_tier` (the scheduler side,
the worker side and the record format; their docstrings cover threads, faults, eviction and
approximate reuse). Limits: one worker (tensor/pipeline parallel size 1), one KV-cache group,
the seqkv attention backend (pages of uint8 slots), ``hash_block_size == block_size``.
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
    """What a block key depends on besides vLLM's block hash (which chains the parent hash,
    the block's tokens and the request's extra keys, ``cache_salt`` among them)."""
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
                from vllm_seqkv.tiers.redis_storage import RedisStorage  # shared: ask the server

                probe = RedisStorage(self.cold.url)
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
