"""The worker side of the cold tier: blocks between vLLM's pages and a tier, off the engine loop."""

from __future__ import annotations

import time
from typing import Any

import torch

from vllm_seqkv.integration.cold_tier.messages import (
    BlockJob,
    ColdTierMetadata,
    ColdTierWorkerMetadata,
    LoadResult,
)
from vllm_seqkv.integration.cold_tier.store import BlockStore
from vllm_seqkv.integration.compat import init_logger

logger = init_logger("vllm.seqkv.connector")

SHUTDOWN_SAVE_TIMEOUT_S = 60.0
SHUTDOWN_LOAD_TIMEOUT_S = 30.0


def make_tier(cold, codec):
    from vllm_seqkv.tiers import DiskTier, MemoryTier, RedisTier

    if cold.kind == "cpu":
        return MemoryTier(codec, cold.capacity_bytes)
    if cold.kind == "disk":
        return DiskTier(cold.path, codec, cold.capacity_bytes)
    return RedisTier(cold.url, codec, cold.capacity_bytes)


def code_model_for_engine(engine, layers: int, heads: int, slot_bytes: int):
    """The code-level coder whose prior ``python -m vllm_seqkv.calibrate`` fitted for this
    model and preset, or None (then the byte-level coder) when there is none or it was fitted
    for other slots."""
    from pathlib import Path

    from vllm_seqkv.calibrate import cold_prior_path
    from vllm_seqkv.tiers.code_model import CodeModelCodec, kv_layouts, layouts_digest

    path = cold_prior_path(Path(engine.model_dir), engine.preset, engine.config.calibration)
    if not path.exists():
        logger.info("seqkv cold tier: no code-level coder prior at %s (run `python -m "
                    "vllm_seqkv.calibrate %s --preset %s`); using the byte-level coder", path,
                    engine.model_dir, engine.preset)
        return None
    try:
        coder = CodeModelCodec.load_prior(path)
        want = kv_layouts(engine.codec, layers, heads, engine.head_dim, slot_bytes)
    except Exception as e:  # a damaged or foreign file: the byte-level coder, loudly
        logger.warning("seqkv cold tier: cannot use the coder prior %s (%s); using the "
                       "byte-level coder", path, e)
        return None
    if layouts_digest(coder.layouts) != layouts_digest(want):
        logger.warning("seqkv cold tier: the coder prior %s was fitted for other slots; using "
                       "the byte-level coder (refit with `python -m vllm_seqkv.calibrate`)", path)
        return None
    return coder


def cost_model(hidden: int, heads: int, block_size: int, slot_bytes: int, layers: int):
    """The placement policy's restore-versus-recompute cost for this model (only its ratios
    across blocks matter: deeper blocks cost more attention FLOPs to recompute)."""
    from vllm_seqkv.plt.policy import CostModel

    return CostModel(params=12 * layers * hidden**2, layers=layers, hidden=hidden,
                     block_bytes=layers * heads * block_size * slot_bytes)


class ColdTierWorker:
    """Saves finished requests' blocks (engine thread: a byte copy; a background thread:
    coding and storing) and restores parked requests' blocks (a loader thread), reporting
    to the scheduler side which keys changed.

    ``cold``: the ``cold_tier`` options (``save_queue_bytes``, ``eviction``); ``store``: the
    pages and the tier (:class:`BlockStore`); ``inventory_sent``: False to report, once, the
    blocks the tier already held (a disk tier a previous engine filled).

    Saves: in ``wait_for_save`` of the step after a request finishes (vLLM holds its blocks
    until then: ``request_finished`` returns True) the engine thread only copies the blocks'
    bytes out of the pages, deepest first, and releases them; the
    :class:`~vllm_seqkv.tiers.BackgroundSaver` codes and stores the copies, and a key counts
    as held once reported stored. Pending copies are bounded (``save_queue_bytes``): beyond
    that a save is dropped with a warning (a later recompute), never a stall. A save that
    fails leaves the block uncached; queued saves are finished at shutdown.

    Loads: ``start_load_kv`` hands each step's jobs to one loader thread
    (:class:`~vllm_seqkv.tiers.JobThread`), which per block fetches and decodes the blob (tier
    calls under ``BlockStore.lock``: the saver shares the tier) and copies its page bytes into
    the parked request's blocks (no forward touches them meanwhile). The sink rows
    (:class:`~vllm_seqkv.integration.engine_codec.SinkTable`, not thread-safe) are only parsed
    there; the engine thread installs them in ``get_finished`` before it reports the request.
    A request aborted while loading keeps its blocks until then (vLLM frees a parked
    request's blocks only on ``finished_recving``) and the loader skips its remaining blocks.
    Shutdown waits ``SHUTDOWN_LOAD_TIMEOUT_S`` for pending loads.

    Faults: a missing or corrupt blob, or a failing tier, stops the job at that block; its id
    and every later one of the job go out in ``get_block_ids_with_load_errors`` no later than
    the request's ``finished_recving``, so vLLM keeps the blocks before it and recomputes the
    rest. NOTE: vLLM 0.32 still counts such recomputed tokens in ``num_cached_tokens`` (what
    the connector claimed at scheduling); the engine log names every failed load.

    Eviction is the tier's (``cold_tier.eviction``): ``plt`` hands the tier's placement the
    chain of block keys of each finished request (:mod:`vllm_seqkv.plt.placement`: the leaf
    with the fewest expected reuses per byte goes, never a prefix before its extensions);
    ``lru`` evicts the least recently used block (a restored prefix's root counts as the most
    recent).
    """

    def __init__(self, cold, block_size: int, store: BlockStore, inventory_sent: bool = False):
        from vllm_seqkv.tiers import BackgroundSaver, JobThread

        self.cold = cold
        self.block_size = block_size
        self.store = store
        self.saver = BackgroundSaver(store.tier, store.lock, cold.save_queue_bytes)
        self.loader = JobThread(self._run_load, name="seqkv-cold-loader")
        self._loading: dict[str, BlockJob] = {}  # req id -> its job in the loader
        self._cancelled: set[str] = set()  # finished while loading: the loader skips the rest
        self._done_recving: set[str] = set()
        self._failed_keys: set[bytes] = set()
        self._done_sending: set[str] = set()
        self._load_errors: set[int] = set()
        self._changed: set[bytes] = set()
        self._inventory_sent = inventory_sent
        self._stats_delta = None
        self.stats = {"saved_blocks": 0, "save_failures": 0, "saves_dropped": 0,
                      "loaded_blocks": 0, "load_failures": 0, "copy_s": 0.0, "load_s": 0.0}

    @classmethod
    def for_pages(cls, cold, pages: list[torch.Tensor], engine, hidden: int) -> "ColdTierWorker":
        """The worker over vLLM's pages (uint8 ``[num_blocks, H, block_size, slot_bytes]`` per
        layer, in layer order) of the engine codec ``engine``."""
        from vllm_seqkv.plt.placement import LearnedEviction

        if any(p.dim() != 4 for p in pages):
            raise NotImplementedError("seqkv cold tier needs the seqkv attention backend's pages "
                                      "[num_blocks, heads, block_size, slot_bytes]")
        _, heads, bs, slot = pages[0].shape
        head = code_model_for_engine(engine, len(pages), heads, slot) if cold.entropy_coding else None
        codec = BlockStore.codec_for(len(pages), heads, bs, slot, cold.entropy_coding, head)
        tier = make_tier(cold, codec)
        if cold.eviction == "plt":
            tier.held.set_placement(LearnedEviction(bs, cost_model(hidden, heads, bs, slot, len(pages))))
        store = BlockStore(tier, pages, engine.sinks, engine.head_dim)
        logger.info("seqkv cold tier: %s tier%s, %d bytes, %s eviction, %d layers x %d heads x %d "
                    "tokens x %d slot bytes per block (%d raw bytes), entropy coding %s",
                    cold.kind, f" at {cold.path}" if cold.path else "", cold.capacity_bytes,
                    cold.eviction, len(pages), heads, bs, slot, store.page_bytes,
                    ("off" if not cold.entropy_coding else
                     "code-level" if head is not None else "byte-level"))
        return cls(cold, bs, store)

    def start_load_kv(self, meta) -> None:
        """Hand this step's load jobs to the loader thread (vLLM calls this after launching
        the forward: the jobs' requests are parked, no forward touches their blocks)."""
        if not isinstance(meta, ColdTierMetadata) or not meta.loads:
            return
        for job in meta.loads:
            self._loading[job.req_id] = job
            if not self.loader.submit(job):  # closed (shutting down): nothing loaded
                self._finish_load(job, LoadResult(failed=0))

    def _run_load(self, job: BlockJob) -> LoadResult:
        """On the loader thread: decode the job's blocks in order and copy their page bytes
        into the request's blocks; stop at the first block that cannot be loaded. Sink rows
        are only parsed (the engine thread installs them, :meth:`_finish_load`)."""
        t0 = time.perf_counter()
        res = LoadResult()
        for j, (block, key) in enumerate(zip(job.block_ids, job.keys)):
            if job.req_id in self._cancelled:
                res.cancelled = True
                break
            sinks = self.store.load_pages(key, block)
            if sinks is None:
                res.failed = j
                break
            res.sinks.append(sinks)
            res.done += 1
        with self.store.lock:  # the prefix root is the most recent: LRU evicts the
            for key in reversed(job.keys[:res.done]):  # deepest blocks first
                self.store.tier.touch(key)
        if res.done and self.store.pages[0].is_cuda:  # the bytes are in the pages before
            torch.cuda.current_stream(self.store.pages[0].device).synchronize()  # we report
        res.seconds = time.perf_counter() - t0
        return res

    def _collect_loads(self) -> None:
        """Engine thread: take the jobs the loader finished; their requests are reported in
        finished_recving, their unloaded blocks in get_block_ids_with_load_errors. Both
        calls collect first, so whatever order vLLM calls them in, a request's failed block
        ids go out no later than its finished_recving."""
        if self.loader is not None:
            for job, res in self.loader.take_finished():
                self._finish_load(job, res if res is not None else LoadResult(failed=0))

    def _finish_load(self, job: BlockJob, res: LoadResult) -> None:
        self._loading.pop(job.req_id, None)
        cancelled = res.cancelled or job.req_id in self._cancelled
        self._cancelled.discard(job.req_id)
        for block, sinks in zip(job.block_ids, res.sinks):  # pages in place: now the rows
            self.store.install_sinks(block, sinks)
        tried = res.done + (res.failed is not None)
        self._changed.update(job.keys[:tried])  # the scheduler learns what is still held
        if res.failed is not None:
            j = res.failed
            self._load_errors.update(job.block_ids[j:])  # vLLM recomputes from block j
            self._failed_keys.add(job.keys[j])
            self.stats["load_failures"] += 1
            logger.warning("seqkv cold tier: block %d of request %s missing or corrupt; vLLM "
                           "recomputes from token %d", j, job.req_id,
                           job.first_token + j * self.block_size)
        self.stats["loaded_blocks"] += res.done
        self.stats["load_s"] += res.seconds
        logger.info("seqkv cold tier: restored %d blocks (%d tokens) of request %s in %.1f ms%s",
                    res.done, res.done * self.block_size, job.req_id, res.seconds * 1e3,
                    " (request finished meanwhile: rest skipped)" if cancelled else "")
        self._done_recving.add(job.req_id)

    def wait_for_save(self, meta) -> None:
        """Copy the saves' blocks out of the pages (engine thread) and queue them for the
        background saver; vLLM may reuse the blocks once the request is reported sent."""
        if not isinstance(meta, ColdTierMetadata):
            return
        if meta.accesses:
            with self.store.lock:
                for chain in meta.accesses:
                    self.store.tier.held.placement.access(chain)
        for job in meta.saves:
            t0 = time.perf_counter()
            # deepest first: the tier's LRU then holds the prefix root as the most recent
            starts = job.starts or [True] * len(job.keys)
            for block, key, start in zip(reversed(job.block_ids), reversed(job.keys),
                                         reversed(starts)):
                record = self.store.read(block, start)
                if not self.saver.submit(key, record):
                    self._changed.add(key)  # reported not held: the scheduler may retry later
                    self.stats["saves_dropped"] += 1
                    if self.stats["saves_dropped"] % 100 == 1:
                        logger.warning(
                            "seqkv cold tier: %d bytes of saves pending (save_queue_bytes %d); "
                            "dropping saves (%d so far): the tier is slower than the traffic",
                            self.saver.pending_bytes, self.cold.save_queue_bytes,
                            self.stats["saves_dropped"])
            self.stats["copy_s"] += time.perf_counter() - t0
            self._done_sending.add(job.req_id)  # the pages are copied: vLLM may reuse them

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        # a request finished while loading: the loader skips its remaining blocks (vLLM
        # frees them once it is reported here)
        self._cancelled.update(r for r in finished_req_ids or () if r in self._loading)
        self._collect_loads()
        done, self._done_sending = self._done_sending, set()
        recving, self._done_recving = self._done_recving, set()
        return (done or None), (recving or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        self._collect_loads()  # vLLM 0.32 calls this after get_finished in the same step
        out, self._load_errors = self._load_errors, set()
        return out

    def build_connector_worker_meta(self) -> ColdTierWorkerMetadata | None:
        self._collect_finished_saves()
        tier = self.store.tier
        with self.store.lock:
            changed = self._changed | set(tier.held.take_dropped())
            if not self._inventory_sent:  # blocks a previous engine left on disk
                changed |= set(tier.held.keys())
                self._inventory_sent = True
            failed, self._changed, self._failed_keys = self._failed_keys, set(), set()
            if not changed and not failed:
                return None
            return ColdTierWorkerMetadata({k: tier.held.size(k) for k in changed}, failed)

    def get_kv_connector_stats(self):
        """This step's counter increments and the tier's gauges for vLLM's ``/metrics``."""
        from vllm_seqkv.integration.connector_metrics import StatsDelta

        if self._stats_delta is None:
            self._stats_delta = StatsDelta()
        s = self.worker_stats()
        return self._stats_delta.take(s, {"tier_bytes": s["tier_bytes"],
                                          "tier_blocks": s["tier_blocks"],
                                          "pending_save_bytes": self.saver.pending_bytes})

    def _collect_finished_saves(self) -> None:
        for key, stored in self.saver.take_finished():
            self.stats["saved_blocks" if stored else "save_failures"] += 1
            self._changed.add(key)

    def worker_stats(self) -> dict[str, Any]:
        """Connector and tier counters (the background saver's time as ``save_s``)."""
        self._collect_finished_saves()
        with self.store.lock:
            tier = self.store.tier
            return {**self.stats, "save_s": self.saver.save_s, "tier_bytes": tier.held.nbytes,
                    "tier_raw_bytes": tier.held.raw_nbytes, "tier_blocks": len(tier),
                    **{"tier_" + k: v for k, v in tier.stats.as_dict().items()}}

    def shutdown(self):
        if not self.loader.close(timeout=SHUTDOWN_LOAD_TIMEOUT_S):
            logger.warning("seqkv cold tier: loads still running after %.0f s at shutdown; "
                           "dropped", SHUTDOWN_LOAD_TIMEOUT_S)
        self._collect_loads()
        if not self.saver.close(timeout=SHUTDOWN_SAVE_TIMEOUT_S):
            logger.warning("seqkv cold tier: saves still pending after %.0f s at shutdown; they "
                           "are lost (nothing half-written is kept)", SHUTDOWN_SAVE_TIMEOUT_S)
        logger.info("seqkv cold tier at shutdown: %s", self.worker_stats())
