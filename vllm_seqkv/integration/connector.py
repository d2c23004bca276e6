"""Cold tier for vLLM's prefix cache: a KV connector that keeps blocks beyond the pages.

What it does. When a request finishes, every full block of it that the cold tier does not hold
yet is copied out of vLLM's pages (the seqkv hot code, as bytes) plus, for a sequence's first
block, its exact sink rows (:class:`~.engine_codec.SinkTable`), entropy-coded losslessly
(constriction ANS: the code-level coder of :mod:`vllm_seqkv.plt.code_model` when
``python -m vllm_seqkv.calibrate`` fitted its prior for these slots, else the byte-level
``ColdCodec``), framed with checksums (:mod:`vllm_seqkv.plt.blob`) and stored in a
:mod:`vllm_seqkv.plt.tiers` tier (CPU RAM, local disk with atomic writes, or Redis). vLLM's
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

Where the work runs. Scheduler side: an index of the keys the worker reported stored
(plus, for disk and Redis, the tier itself: blocks another engine stored), the load and
save plans. Worker side: the tier and the byte copies. In ``wait_for_save`` of the step
after a request finishes (its blocks are held until then: ``request_finished`` returns
True) the engine thread only copies the blocks' bytes out of the pages and releases them;
a background thread (:class:`~vllm_seqkv.plt.tiers.BackgroundSaver`) entropy-codes and
stores the copies, and a key counts as held once the worker reports it stored. Pending
copies are bounded (``cold_tier.save_queue_bytes``): beyond that a save is dropped with a
warning (a later recompute), never a stall. At shutdown the queued saves are finished.
Loads: ``start_load_kv`` only hands each step's load jobs to one loader thread
(:class:`~vllm_seqkv.plt.tiers.JobThread`), which, per block, fetches and decodes the
blob under ``BlockStore.lock`` (the saver shares the tier) and copies its page bytes into
the parked request's blocks (no forward touches them meanwhile). The sink rows
(:class:`~.engine_codec.SinkTable`, not thread-safe) are only parsed there: the engine
thread installs them in ``get_finished`` before it reports the request finished. A request
aborted while loading keeps its blocks until then (vLLM frees a ``WAITING_FOR_REMOTE_KVS``
request's blocks only on ``finished_recving``); the loader skips its remaining blocks.
At shutdown pending loads are waited for (``SHUTDOWN_LOAD_TIMEOUT_S``).

Cost (CPU, measured through vLLM on SmolLM2 with the code-level coder, see BENCHMARKS.md):
restoring a block of 128 tokens x 30 layers takes ~90 ms (decode + copy into the pages),
4.9x faster than prefilling the same tokens, on the loader thread (the decode without the
tier's lock): the engine loop keeps stepping the other requests meanwhile (its slowest step
during an 8-block restore: 0.53 s, against 1.15 s of load), the restored request waits for
its load plus up to two engine steps; saving costs the engine loop ~1 ms per block (the
copy) and the background thread ~100 ms; the tier holds 2.56 bits/element against 3.03 in
the pages. ``cold_tier.entropy_coding: false`` stores the bytes raw.

Limits: one worker (tensor/pipeline parallel size 1), one KV-cache group, the seqkv
attention backend (pages of uint8 slots), ``hash_block_size == block_size``.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vllm_seqkv.config import ColdTierConfig, SeqKVConfig, from_additional_config
from vllm_seqkv.integration import compat
from vllm_seqkv.integration.compat import (
    CacheHitSource,
    KVConnectorBase_V1,
    KVConnectorFactory,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
    KVTransferConfig,
    extract_layer_index,
    init_logger,
)
from vllm_seqkv.plt.placement import LearnedEviction

logger = init_logger("vllm.seqkv.connector")

CONNECTOR_NAME = "SeqKVColdTierConnector"
MODULE_PATH = __name__
PROBE_BACKOFF_S = 10.0
SHUTDOWN_SAVE_TIMEOUT_S = 60.0
SHUTDOWN_LOAD_TIMEOUT_S = 30.0


# ---- configuration ------------------------------------------------------------------------
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


def block_key(ns: bytes, block_hash: bytes) -> bytes:
    return hashlib.blake2b(ns + bytes(block_hash), digest_size=20).digest()


def make_tier(cold: ColdTierConfig, codec):
    from vllm_seqkv.plt.tiers import DiskTier, MemoryTier, RedisTier

    if cold.kind == "cpu":
        return MemoryTier(codec, cold.capacity_bytes)
    if cold.kind == "disk":
        return DiskTier(cold.path, codec, cold.capacity_bytes)
    return RedisTier(cold.url, codec, cold.capacity_bytes)


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


def code_model_for_engine(engine, layers: int, heads: int, slot_bytes: int):
    """The code-level coder whose prior ``python -m vllm_seqkv.calibrate`` fitted for this
    model and preset, or None (then the byte-level coder) when there is none or it was fitted
    for other slots."""
    from pathlib import Path

    from vllm_seqkv.calibrate import cold_prior_path
    from vllm_seqkv.plt.code_model import CodeModelCodec, kv_layouts, layouts_digest

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


# ---- worker side: pages <-> blobs ---------------------------------------------------------
_SINK_HEAD = struct.Struct("<HH")  # layer, offset


class BlockStore:
    """Copies whole blocks between vLLM's pages and a tier.

    ``pages``: one uint8 tensor ``[num_blocks, H, block_size, slot_bytes]`` per layer, in
    layer order. A block's record: the page bytes laid out ``[layer, token, head, slot]``
    (rows of ``H x slot_bytes`` bytes, the layout ``ColdCodec`` models per column), then the
    exact sink rows of a sequence's first block (``u32 count``, then per entry ``u16 layer,
    u16 offset, K, V`` as float32 ``[H, D]``; count 0 for other blocks).

    NOTE: every tier call holds ``lock`` (a background saver and loader share the tier),
    except the pure ``encode_block`` / ``decode_block``.
    """

    def __init__(self, tier, pages: list[torch.Tensor], sinks=None, head_dim: int | None = None):
        self.tier = tier
        self.lock = threading.Lock()
        self.pages = pages
        self.sinks = sinks
        self.head_dim = head_dim
        _, self.heads, self.block_size, self.slot_bytes = pages[0].shape
        self.page_bytes = len(pages) * self.heads * self.block_size * self.slot_bytes

    @staticmethod
    def codec_for(layers: int, heads: int, block_size: int, slot_bytes: int, entropy: bool = True,
                  head=None):
        """Raw bytes, or the page bytes through ``head`` (default: the byte-level
        ``ColdCodec``) and the sink rows raw."""
        from vllm_seqkv.plt.entropy import ColdCodec, RawCodec, SplitCodec

        if not entropy:
            return RawCodec()
        return SplitCodec(head or ColdCodec(columns=heads * slot_bytes),
                          layers * heads * block_size * slot_bytes)

    # -- record <-> pages --
    def read(self, block: int, starts_sequence: bool = True) -> bytes:
        """The block's record; its exact sink rows only when it is a sequence's first block."""
        stacked = torch.stack([p[block] for p in self.pages]).cpu()  # [L, H, bs, S]
        out = stacked.permute(0, 2, 1, 3).contiguous().numpy().tobytes()
        return out + self._export_sinks(block if starts_sequence else None)

    def write_pages(self, block: int, record: bytes) -> dict[int, dict]:
        """Copy the record's page bytes into ``block`` and return its parsed sink rows (for
        :meth:`install_sinks`). Parses first: a record that does not fit changes nothing.
        Touches no sink table, so a background loader may call it."""
        if len(record) < self.page_bytes:
            raise ValueError(f"record of {len(record)} bytes < {self.page_bytes} page bytes")
        L, H, bs, S = len(self.pages), self.heads, self.block_size, self.slot_bytes
        arr = np.frombuffer(record, np.uint8, count=self.page_bytes).reshape(L, bs, H, S)
        sinks = self._parse_sinks(record[self.page_bytes:])  # parse first: all or nothing
        for layer, p in enumerate(self.pages):
            p[block].copy_(torch.from_numpy(arr[layer].transpose(1, 0, 2).copy()))
        return sinks

    def install_sinks(self, block: int, sinks: dict[int, dict]) -> None:
        """Install ``block``'s sink rows (``write_pages`` gave them) once its pages are in
        place. NOTE: the sink table is not thread-safe: the engine thread only."""
        if self.sinks is not None:
            for layer in range(len(self.pages)):
                self.sinks.import_(layer, block, sinks.get(layer, {}))

    def _export_sinks(self, block: int | None) -> bytes:
        if self.sinks is None or block is None:
            return struct.pack("<I", 0)
        parts, count = [], 0
        for layer in range(len(self.pages)):
            for offset, (k, v) in sorted(self.sinks.export(layer, block).items()):
                parts.append(_SINK_HEAD.pack(layer, offset) + k.float().cpu().contiguous().numpy().tobytes()
                             + v.float().cpu().contiguous().numpy().tobytes())
                count += 1
        return struct.pack("<I", count) + b"".join(parts)

    def _parse_sinks(self, tail: bytes) -> dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
        if len(tail) < 4:
            raise ValueError("record has no sink section")
        (count,) = struct.unpack_from("<I", tail)
        out: dict[int, dict] = {}
        if count == 0:
            return out
        if self.head_dim is None:
            raise ValueError("record carries sink rows but the head size is unknown")
        n = self.heads * self.head_dim
        size = _SINK_HEAD.size + 8 * n
        if len(tail) != 4 + count * size:
            raise ValueError("sink section length mismatch")
        for i in range(count):
            at = 4 + i * size
            layer, offset = _SINK_HEAD.unpack_from(tail, at)
            vals = np.frombuffer(tail, np.float32, count=2 * n, offset=at + _SINK_HEAD.size)
            k = torch.from_numpy(vals[:n].copy()).view(self.heads, self.head_dim)
            v = torch.from_numpy(vals[n:].copy()).view(self.heads, self.head_dim)
            out.setdefault(layer, {})[offset] = (k, v)
        return out

    # -- tier --
    def save(self, key: bytes, block: int) -> bool:
        record = self.read(block)
        with self.lock:
            return self.tier.save(key, record)

    def load_pages(self, key: bytes, block: int) -> dict[int, dict] | None:
        """Decode ``key``'s blob and copy its page bytes into ``block``: the block's sink rows
        (to :meth:`install_sinks`), or None when it is missing, corrupt or does not fit (then
        the pages keep what they held). Touches no sink table: a background loader calls it."""
        t0 = time.perf_counter()
        with self.lock:
            blob = self.tier.fetch(key)
        record = self.tier.decode_block(key, blob)  # the slow part: the tier is free meanwhile
        with self.lock:
            self.tier.finish_load(key, blob, record, time.perf_counter() - t0)
        if record is None:
            return None
        try:
            return self.write_pages(block, record)
        except Exception as e:  # a verified blob of another shape: refuse, recompute
            logger.warning("seqkv cold tier: block %s does not fit the pages (%s); "
                           "recomputing", key.hex()[:16], e)
            with self.lock:
                self.tier.delete(key)
            return None

    def load(self, key: bytes, block: int) -> bool:
        """Pages and sink rows of ``key`` into ``block`` on the calling thread."""
        sinks = self.load_pages(key, block)
        if sinks is None:
            return False
        self.install_sinks(block, sinks)
        return True


# ---- metadata -----------------------------------------------------------------------------
@dataclass
class BlockJob:
    req_id: str
    block_ids: list[int]
    keys: list[bytes]
    first_token: int = 0  # token index of the first block (for log lines)
    starts: list[bool] = field(default_factory=list)  # saves: block i is the request's first


@dataclass
class LoadResult:
    """What the loader thread did for one load job: the pages of its first ``done`` blocks
    are in place (``sinks[i]``: block i's parsed sink rows, installed by the engine thread);
    ``failed``: the index of the block that could not be loaded (the job stopped there);
    ``cancelled``: the request finished meanwhile and the rest was skipped."""

    done: int = 0
    sinks: list[dict] = field(default_factory=list)
    failed: int | None = None
    cancelled: bool = False
    seconds: float = 0.0


@dataclass
class ColdTierMetadata(KVConnectorMetadata):
    saves: list[BlockJob] = field(default_factory=list)
    loads: list[BlockJob] = field(default_factory=list)
    accesses: list[list[bytes]] = field(default_factory=list)  # finished requests' key chains


@dataclass
class ColdTierWorkerMetadata(KVConnectorWorkerMetadata):
    """Keys whose state changed this step: bytes held, or None (not held any more); keys
    whose load failed (the scheduler does not offer them for a while)."""

    held: dict[bytes, int | None] = field(default_factory=dict)
    failed: set[bytes] = field(default_factory=set)

    def aggregate(self, other: "ColdTierWorkerMetadata") -> "ColdTierWorkerMetadata":
        return ColdTierWorkerMetadata({**self.held, **other.held}, self.failed | other.failed)


# ---- the connector ------------------------------------------------------------------------
class SeqKVColdTierConnector(KVConnectorBase_V1):
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
        self.ns = namespace(vllm_config, self.config)
        self._cache_hit_source = {"cpu": CacheHitSource.HOST, "disk": CacheHitSource.DISK}.get(
            self.cold.kind, CacheHitSource.EXTERNAL_UNSPECIFIED)
        # scheduler side
        self._held: dict[bytes, int] = {}
        self._saving: set[bytes] = set()
        self._lookup_start: dict[str, int] = {}
        self._saves: list[BlockJob] = []
        self._loads: list[BlockJob] = []
        self._accesses: list[list[bytes]] = []
        self._loading_reqs: set[str] = set()  # requests whose load is in flight
        self._failed_until: dict[bytes, float] = {}  # keys whose load failed: not offered
        self._probe = None
        self._probe_off_until = 0.0
        self._approx, self._approx_allowed = None, 0
        self._approx_plans: dict[str, list[bytes]] = {}  # req id -> source keys to load
        self._approx_stats = {"approx_requests": 0, "approx_blocks": 0}
        self._approx_delta = None
        if role == KVConnectorRole.SCHEDULER:
            self._approx, self._approx_allowed = approximate_reuse_for(
                vllm_config, self.cold.approximate, self.block_size)
        if role == KVConnectorRole.SCHEDULER and self.cold.kind == "redis":
            from vllm_seqkv.plt.tiers import RedisTier  # shared across nodes: ask the server

            self._probe = RedisTier(self.cold.url)
        self._init_worker_state()

    def _init_worker_state(self) -> None:
        """The worker side's state before ``register_kv_caches`` (no tier, no threads yet)."""
        self.store: BlockStore | None = None
        self.saver = None
        self.loader = None
        self._loading: dict[str, BlockJob] = {}  # req id -> its job in the loader
        self._cancelled: set[str] = set()  # finished while loading: the loader skips the rest
        self._done_recving: set[str] = set()
        self._failed_keys: set[bytes] = set()
        self._done_sending: set[str] = set()
        self._load_errors: set[int] = set()
        self._changed: set[bytes] = set()
        self._inventory_sent = False
        self._stats_delta = None
        self.stats = {"saved_blocks": 0, "save_failures": 0, "saves_dropped": 0,
                      "loaded_blocks": 0, "load_failures": 0, "copy_s": 0.0, "load_s": 0.0}

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped save is a later miss

    # ==== scheduler side ====
    def _key(self, block_hash) -> bytes:
        return block_key(self.ns, block_hash)

    def _has(self, key: bytes) -> bool:
        if key in self._failed_until:  # a load failed (an unreadable file, Redis down):
            if time.monotonic() < self._failed_until[key]:  # do not offer it again at once
                return False
            del self._failed_until[key]
        if key in self._held:
            return True
        if self._probe is not None and time.monotonic() >= self._probe_off_until:
            try:
                if self._probe.client.exists(self._probe.prefix + key):
                    return True
            except Exception as e:  # server down: serve by recompute, retry in a while
                self._probe_off_until = time.monotonic() + PROBE_BACKOFF_S
                logger.warning("seqkv cold tier: redis at %s unreachable (%s); requests are "
                               "served by recompute, next try in %.0f s", self.cold.url, e,
                               PROBE_BACKOFF_S)
        if self.cold.kind == "disk":
            from pathlib import Path

            return (Path(self.cold.path) / f"{key.hex()}.blob").exists()
        return False

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        bs = self.block_size
        start = num_computed_tokens // bs
        limit = min((request.num_tokens - 1) // bs, len(request.block_hashes))
        n = 0
        for i in range(start, limit):
            if not self._has(self._key(request.block_hashes[i])):
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
            keys = [self._key(h) for h in request.block_hashes[start:start + n]]
        else:
            keys = keys[:n]
            self._approx_stats["approx_requests"] += 1
            self._approx_stats["approx_blocks"] += n
        self._loads.append(BlockJob(request.request_id, list(ids), keys, start * self.block_size))
        self._loading_reqs.add(request.request_id)

    def _opted_in(self, request) -> bool:
        salt = getattr(request, "cache_salt", None)
        return (self._approx is not None and salt is not None
                and salt.startswith(self.cold.approximate.salt_prefix))

    def _near_match(self, request, limit: int) -> list[bytes]:
        """Keys of the longest near match of the request's first ``limit`` blocks among its
        source tenant's exact blocks (the salt after the opt-in prefix)."""
        source = request.cache_salt[len(self.cold.approximate.salt_prefix):]
        tokens = request.all_token_ids[:limit * self.block_size]
        found, keys = self._approx.match(tokens, source, self._approx_allowed, self._has)
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
        chain = [self._key(h) for h in request.block_hashes[:n]]
        if chain and self._approx is not None and not self._opted_in(request):
            self._approx.insert(request.all_token_ids[:n * self.block_size],
                                request.cache_salt or "", chain)
        if chain and self.cold.eviction == "plt":
            self._accesses.append(chain)
        ids, keys, starts = [], [], []
        for i, k in enumerate(chain):
            if k in self._held or k in self._saving:
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
                self._held.pop(k, None)
                if self._approx is not None:
                    self._approx.forget(k)
            else:
                self._held[k] = n
        until = time.monotonic() + PROBE_BACKOFF_S
        for k in meta.failed:
            self._failed_until[k] = until

    # ==== worker side ====
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        from vllm_seqkv.integration.engine_codec import active_engine_codec

        layers = sorted(kv_caches, key=extract_layer_index)
        pages = [t.view(torch.uint8) if t.dtype != torch.uint8 else t for t in
                 (kv_caches[name] for name in layers)]
        if any(p.dim() != 4 for p in pages):
            raise NotImplementedError("seqkv cold tier needs the seqkv attention backend's pages "
                                      "[num_blocks, heads, block_size, slot_bytes]")
        engine = active_engine_codec()
        _, heads, bs, slot = pages[0].shape
        head = (code_model_for_engine(engine, len(pages), heads, slot)
                if self.cold.entropy_coding else None)
        codec = BlockStore.codec_for(len(pages), heads, bs, slot, self.cold.entropy_coding, head)
        tier = make_tier(self.cold, codec)
        if self.cold.eviction == "plt":
            tier.set_placement(LearnedEviction(bs, self._cost_model(heads, bs, slot, len(pages))))
        self.store = BlockStore(tier, pages, engine.sinks, engine.head_dim)
        from vllm_seqkv.plt.tiers import BackgroundSaver, JobThread

        self.saver = BackgroundSaver(tier, self.store.lock, self.cold.save_queue_bytes)
        self.loader = JobThread(self._run_load, name="seqkv-cold-loader")
        logger.info("seqkv cold tier: %s tier%s, %d bytes, %s eviction, %d layers x %d heads x %d "
                    "tokens x %d slot bytes per block (%d raw bytes), entropy coding %s",
                    self.cold.kind,
                    f" at {self.cold.path}" if self.cold.path else "", self.cold.capacity_bytes,
                    self.cold.eviction, len(pages), heads, bs, slot, self.store.page_bytes,
                    ("off" if not self.cold.entropy_coding else
                     "code-level" if head is not None else "byte-level"))

    def _cost_model(self, heads: int, block_size: int, slot_bytes: int, layers: int):
        """The policy's restore-versus-recompute cost for this model (only its ratios across
        blocks matter: deeper blocks cost more attention FLOPs to recompute)."""
        from vllm_seqkv.plt.policy import CostModel

        hidden = self._vllm_config.model_config.get_hidden_size()
        return CostModel(params=12 * layers * hidden**2, layers=layers, hidden=hidden,
                         block_bytes=layers * heads * block_size * slot_bytes)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        """Hand this step's load jobs to the loader thread (vLLM calls this after launching
        the forward: the jobs' requests are parked, no forward touches their blocks)."""
        meta = self._connector_metadata
        if not isinstance(meta, ColdTierMetadata) or not meta.loads or self.store is None:
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

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return

    def wait_for_save(self):
        meta = self._connector_metadata
        if not isinstance(meta, ColdTierMetadata) or self.store is None:
            return
        if meta.accesses:
            with self.store.lock:
                for chain in meta.accesses:
                    self.store.tier.placement.access(chain)
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
        if self.store is None:
            return None
        self._collect_finished_saves()
        tier = self.store.tier
        with self.store.lock:
            changed = self._changed | set(tier.take_dropped())
            if not self._inventory_sent:  # blocks a previous engine left on disk
                changed |= set(tier._sizes)
                self._inventory_sent = True
            failed, self._changed, self._failed_keys = self._failed_keys, set(), set()
            if not changed and not failed:
                return None
            return ColdTierWorkerMetadata({k: tier.stored_bytes(k) for k in changed}, failed)

    def get_kv_connector_stats(self):
        """This step's counter increments and the tier's gauges (worker), or approximate
        reuse's counter increments (scheduler), for vLLM's ``/metrics`` (see
        :mod:`.connector_metrics`)."""
        from vllm_seqkv.integration.connector_metrics import StatsDelta

        if self.store is None:  # the scheduler side: approximate reuse's counters
            if self._approx is None:
                return None
            if self._approx_delta is None:
                self._approx_delta = StatsDelta()
            return self._approx_delta.take(self._approx_stats, {})
        if self._stats_delta is None:
            self._stats_delta = StatsDelta()
        s = self.worker_stats()
        return self._stats_delta.take(s, {"tier_bytes": s["tier_bytes"],
                                          "tier_blocks": s["tier_blocks"],
                                          "pending_save_bytes": self.saver.pending_bytes})

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None):
        from vllm_seqkv.integration.connector_metrics import ColdTierStats

        return ColdTierStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        from vllm_seqkv.integration.connector_metrics import ColdTierPromMetrics

        return ColdTierPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def _collect_finished_saves(self) -> None:
        for key, stored in self.saver.take_finished():
            self.stats["saved_blocks" if stored else "save_failures"] += 1
            self._changed.add(key)

    def worker_stats(self) -> dict[str, Any]:
        """Connector and tier counters (the background saver's time as ``save_s``)."""
        self._collect_finished_saves()
        with self.store.lock:
            tier = self.store.tier
            return {**self.stats, "save_s": self.saver.save_s, "tier_bytes": tier.nbytes,
                    "tier_raw_bytes": tier.raw_nbytes, "tier_blocks": len(tier),
                    **{"tier_" + k: v for k, v in tier.stats.items()}}

    def shutdown(self):
        if self.store is None:
            return
        if not self.loader.close(timeout=SHUTDOWN_LOAD_TIMEOUT_S):
            logger.warning("seqkv cold tier: loads still running after %.0f s at shutdown; "
                           "dropped", SHUTDOWN_LOAD_TIMEOUT_S)
        self._collect_loads()
        if not self.saver.close(timeout=SHUTDOWN_SAVE_TIMEOUT_S):
            logger.warning("seqkv cold tier: saves still pending after %.0f s at shutdown; they "
                           "are lost (nothing half-written is kept)", SHUTDOWN_SAVE_TIMEOUT_S)
        logger.info("seqkv cold tier at shutdown: %s", self.worker_stats())
