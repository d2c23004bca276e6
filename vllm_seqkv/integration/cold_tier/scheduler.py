"""The scheduler side of the cold tier: which blocks the tier holds and what to move."""

from __future__ import annotations

import hashlib
import time
from typing import Any

from vllm_seqkv.integration.cold_tier.messages import BlockJob, ColdTierMetadata, ColdTierWorkerMetadata
from vllm_seqkv.integration.compat import init_logger

logger = init_logger("vllm.seqkv.connector")

PROBE_BACKOFF_S = 10.0


def block_key(ns: bytes, block_hash: bytes) -> bytes:
    return hashlib.blake2b(ns + bytes(block_hash), digest_size=20).digest()


def approximate_reuse_for(vllm_config, approx, block_size: int):
    """The index and the number of substituted tokens the gate allows, or (None, 0) when
    approximate reuse is off. Raises when the gate was measured for another model."""
    from pathlib import Path

    from vllm_seqkv.plt.approximate import ApproximateIndex, QualityGate

    if approx is None:
        return None, 0
    gate = QualityGate.load(approx.gate)
    served = Path(str(vllm_config.model_config.model)).name
    if gate.model.lower() != served.lower():
        raise ValueError(f"seqkv cold tier: the approximate-reuse gate {approx.gate} was measured "
                         f"for model {gate.model!r}, not {served!r}; measure one for this model")
    allowed = gate.max_substitutions(approx.max_kl)
    if allowed == 0:
        logger.warning("seqkv cold tier: the gate %s allows no substituted token within max_kl "
                       "%.4g nats/token: approximate reuse serves exact matches only",
                       approx.gate, approx.max_kl)
    logger.info("seqkv cold tier: approximate reuse for cache salts '%s...': up to %d "
                "substituted tokens (gate %s, max_kl %.4g)", approx.salt_prefix, allowed,
                approx.gate, approx.max_kl)
    return ApproximateIndex(block_size, approx.max_index_blocks), allowed



class ColdTierScheduler:
    """Offers held blocks after vLLM's own prefix hit as asynchronous loads, plans the saves
    of finished requests, and learns from the worker which keys the tier holds.

    ``held``: key -> stored bytes, as the worker reported them (plus, for a disk or Redis
    tier, what ``probe``, a :class:`~vllm_seqkv.tiers.redis_storage.RedisStorage`, or the folder
    holds: blocks another engine stored). ``approx`` /
    ``approx_allowed``: the near-match index and the substitutions the quality gate allows
    (None / 0: approximate reuse off). A key whose load failed is not offered again for
    ``PROBE_BACKOFF_S`` (a request whose load failed at its first block looks up its prefix
    again).

    Approximate reuse (``cold_tier.approximate``): a request whose cache salt is
    ``salt_prefix + T`` opts in. When vLLM's prefix cache has nothing for it, the scheduler
    looks up a near match of its prompt among the blocks that tenant ``T``'s exactly computed
    requests left in the tier (:class:`~vllm_seqkv.plt.approximate.ApproximateIndex`), within
    the substituted tokens the model's measured quality gate allows at ``max_kl``, and loads
    those blocks like an exact hit when they are more than the exact hit. vLLM then caches them
    under the request's own hashes, which fold in its own salt: requests that did not opt in
    (and other tenants) never see approximate K/V, and approximate blocks are never the source
    of another near match.
    """

    def __init__(self, cold, ns: bytes, block_size: int, approx=None, approx_allowed: int = 0, probe=None):
        self.cold = cold
        self.ns = ns
        self.block_size = block_size
        self.approx, self.approx_allowed = approx, approx_allowed
        self.probe = probe
        self.held: dict[bytes, int] = {}
        self._saving: set[bytes] = set()
        self._lookup_start: dict[str, int] = {}
        self._saves: list[BlockJob] = []
        self._loads: list[BlockJob] = []
        self._accesses: list[list[bytes]] = []
        self._loading_reqs: set[str] = set()  # requests whose load is in flight
        self._failed_until: dict[bytes, float] = {}  # keys whose load failed: not offered
        self._probe_off_until = 0.0
        self._approx_plans: dict[str, list[bytes]] = {}  # req id -> source keys to load
        self._approx_stats = {"approx_requests": 0, "approx_blocks": 0}
        self._approx_delta = None

    def key_of(self, block_hash) -> bytes:
        return block_key(self.ns, block_hash)

    def _has(self, key: bytes) -> bool:
        if key in self._failed_until:  # a load failed (an unreadable file, Redis down):
            if time.monotonic() < self._failed_until[key]:  # do not offer it again at once
                return False
            del self._failed_until[key]
        if key in self.held:
            return True
        if self.probe is not None and time.monotonic() >= self._probe_off_until:
            try:
                if self.probe.exists(key):
                    return True
            except Exception as e:  # server down: serve by recompute, retry in a while
                self._probe_off_until = time.monotonic() + PROBE_BACKOFF_S
                logger.warning("seqkv cold tier: redis at %s unreachable (%s); requests are "
                               "served by recompute, next try in %.0f s", self.cold.url, e,
                               PROBE_BACKOFF_S)
        if self.cold.kind == "disk":
            from vllm_seqkv.tiers.disk import blob_path

            return blob_path(self.cold.path, key).exists()
        return False

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        bs = self.block_size
        start = num_computed_tokens // bs
        limit = min((request.num_tokens - 1) // bs, len(request.block_hashes))
        n = 0
        for i in range(start, limit):
            if not self._has(self.key_of(request.block_hashes[i])):
                break
            n += 1
        self._lookup_start[request.request_id] = start
        self._approx_plans.pop(request.request_id, None)
        if start == 0 and self._opted_in(request):
            keys = self._near_match(request, limit)
            if len(keys) > n:
                self._approx_plans[request.request_id] = keys
                n = len(keys)
        # asynchronous: vLLM parks the request (WAITING_FOR_REMOTE_KVS) until the worker
        # reports it in finished_recving
        return n * bs, n > 0

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        if num_external_tokens <= 0:
            return
        start = self._lookup_start.pop(request.request_id, None)
        if start is None:
            return
        n = num_external_tokens // self.block_size
        ids = blocks.get_block_ids()[0][start:start + n]
        keys = self._approx_plans.pop(request.request_id, None)
        if keys is None:
            keys = [self.key_of(h) for h in request.block_hashes[start:start + n]]
        else:
            keys = keys[:n]
            self._approx_stats["approx_requests"] += 1
            self._approx_stats["approx_blocks"] += n
        self._loads.append(BlockJob(request.request_id, list(ids), keys, start * self.block_size))
        self._loading_reqs.add(request.request_id)

    def _opted_in(self, request) -> bool:
        salt = getattr(request, "cache_salt", None)
        return (self.approx is not None and salt is not None
                and salt.startswith(self.cold.approximate.salt_prefix))

    def _near_match(self, request, limit: int) -> list[bytes]:
        """Keys of the longest near match of the request's first ``limit`` blocks among its
        source tenant's exact blocks (the salt after the opt-in prefix)."""
        source = request.cache_salt[len(self.cold.approximate.salt_prefix):]
        tokens = request.all_token_ids[:limit * self.block_size]
        found, keys = self.approx.match(tokens, source, self.approx_allowed, self._has)
        if keys:
            logger.info("seqkv cold tier: approximate reuse for request %s: %d blocks of a cached "
                        "prefix, %d substituted tokens", request.request_id, len(keys),
                        len(found.substitutions))
        return keys

    def build_connector_meta(self, scheduler_output) -> ColdTierMetadata:
        meta = ColdTierMetadata(self._saves, self._loads, self._accesses)
        self._saves, self._loads, self._accesses = [], [], []
        return meta

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._lookup_start.pop(request.request_id, None)
        if request.request_id in self._loading_reqs:
            # Finished (aborted) while its load is in flight. NOTE: vLLM 0.32 already keeps
            # the blocks of a WAITING_FOR_REMOTE_KVS request until the worker reports it in
            # finished_recving (Scheduler.finish_requests: delay_free_blocks, freed in
            # _update_from_kv_xfer_finished), so the loader thread never writes a reused
            # block. No save: its blocks may be half-loaded, and returning True would free
            # them a second time on finished_sending.
            self._loading_reqs.discard(request.request_id)
            return False, None
        self._approx_plans.pop(request.request_id, None)
        n = min(len(request.block_hashes), len(block_ids), request.num_computed_tokens // self.block_size)
        chain = [self.key_of(h) for h in request.block_hashes[:n]]
        if chain and self.approx is not None and not self._opted_in(request):
            self.approx.insert(request.all_token_ids[:n * self.block_size],
                                request.cache_salt or "", chain)
        if chain and self.cold.eviction == "plt":
            self._accesses.append(chain)
        ids, keys, starts = [], [], []
        for i, k in enumerate(chain):
            if k in self.held or k in self._saving:
                continue
            ids.append(block_ids[i])
            keys.append(k)
            starts.append(i == 0)
        if not keys:
            return False, None
        self._saving.update(keys)
        self._saves.append(BlockJob(request.request_id, ids, keys, starts=starts))
        return True, None  # hold the blocks until the worker has copied them

    def update_connector_output(self, connector_output) -> None:
        self._loading_reqs.difference_update(getattr(connector_output, "finished_recving", None)
                                             or ())
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        if not isinstance(meta, ColdTierWorkerMetadata):
            return
        for k, n in meta.held.items():
            self._saving.discard(k)
            if n is None:
                self.held.pop(k, None)
                if self.approx is not None:
                    self.approx.forget(k)
            else:
                self.held[k] = n
        until = time.monotonic() + PROBE_BACKOFF_S
        for k in meta.failed:
            self._failed_until[k] = until

    def get_kv_connector_stats(self):
        """Approximate reuse's counter increments for vLLM's ``/metrics`` (None when off)."""
        from vllm_seqkv.integration.connector_metrics import StatsDelta

        if self.approx is None:
            return None
        if self._approx_delta is None:
            self._approx_delta = StatsDelta()
        return self._approx_delta.take(self._approx_stats, {})
