"""Parts of the cold-tier connector without an engine: block records, sink rows, keys, plans."""

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from vllm_seqkv.integration.cold_tier import (
    BlockJob,
    BlockStore,
    ColdTierMetadata,
    ColdTierScheduler,
    ColdTierWorker,
    ColdTierWorkerMetadata,
    block_key,
)
from vllm_seqkv.integration.engine_codec import SinkTable
from vllm_seqkv.plt.approximate import ApproximateIndex
from vllm_seqkv.tiers import DiskTier, Tier
from vllm_seqkv.tiers.disk import DiskStorage
from vllm_seqkv.tiers.storage import MemoryStorage

L, NB, H, BS, S, D = 3, 6, 2, 16, 12, 8


def pages(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (NB, H, BS, S), dtype=torch.uint8, generator=g) for _ in range(L)]


def store(storage, seed=0, entropy=True):
    """A block store over a tier of ``storage`` with the connector's codec for these pages."""
    tier = Tier(storage, BlockStore.codec_for(L, H, BS, S, entropy))
    return BlockStore(tier, pages(seed), SinkTable(1), D)


def with_sink(st, block):
    for layer in range(L):
        k, v = torch.randn(H, D), torch.randn(H, D)
        st.sinks.record(layer, torch.tensor([block]), torch.tensor([0]), torch.tensor([0]),
                        k[None], v[None])


@pytest.mark.parametrize("entropy", [True, False])
def test_block_and_its_sink_rows_move_to_another_block_id(entropy):
    src = store(MemoryStorage(), 0, entropy)
    with_sink(src, 2)
    assert src.save(b"k" * 20, 2)
    dst = BlockStore(src.tier, pages(1), SinkTable(1), D)  # another engine's pages
    with_sink(dst, 5)  # stale entry of whatever block 5 held before
    assert dst.load(b"k" * 20, 5)
    for layer in range(L):
        assert torch.equal(dst.pages[layer][5], src.pages[layer][2])
        exported = src.sinks.export(layer, 2)
        restored = dst.sinks.export(layer, 5)
        assert restored.keys() == exported.keys() == {0}
        assert all(torch.equal(a, b) for a, b in zip(restored[0], exported[0]))


def test_block_without_sink_clears_a_stale_entry():
    src = store(MemoryStorage())
    src.save(b"a" * 20, 1)  # block 1 starts no sequence: no sink rows
    dst = BlockStore(src.tier, pages(1), SinkTable(1), D)
    with_sink(dst, 3)
    assert dst.load(b"a" * 20, 3)
    assert all(dst.sinks.export(layer, 3) == {} for layer in range(L))


def test_corrupt_blob_is_a_miss_and_leaves_the_pages(tmp_path):
    src = store(DiskStorage(tmp_path))
    src.save(b"c" * 20, 0)
    (path,) = tmp_path.glob("*.blob")
    data = bytearray(path.read_bytes())
    data[-3] ^= 1
    path.write_bytes(bytes(data))
    dst = BlockStore(DiskTier(tmp_path, src.tier.coding.codec), pages(1), SinkTable(1), D)
    before = [p[4].clone() for p in dst.pages]
    assert not dst.load(b"c" * 20, 4)
    assert all(torch.equal(p[4], b) for p, b in zip(dst.pages, before))
    assert dst.tier.held.take_dropped() == [b"c" * 20] and not list(tmp_path.glob("*.blob"))


def test_keys_depend_on_namespace_and_hash():
    assert block_key(b"n1", b"h") != block_key(b"n2", b"h") != block_key(b"n1", b"g")


def cold_options(**overrides):
    return SimpleNamespace(**{"kind": "cpu", "eviction": "plt", "save_queue_bytes": 1 << 30,
                              "approximate": None, **overrides})


def fake_connector(held, eviction="plt", **kwargs):
    """The scheduler side, holding the blocks of hashes ``held``."""
    c = ColdTierScheduler(cold_options(eviction=eviction), b"ns", BS, **kwargs)
    c.held = {block_key(b"ns", h): 100 for h in held}
    return c


def request(hashes, num_tokens, computed=0, salt=None, tokens=None, req_id="r"):
    return SimpleNamespace(request_id=req_id, block_hashes=hashes, num_tokens=num_tokens,
                           num_computed_tokens=computed, cache_salt=salt,
                           all_token_ids=list(range(num_tokens)) if tokens is None else tokens)


def test_match_counts_held_blocks_after_the_local_hit_and_leaves_one_token():
    c = fake_connector([b"h0", b"h1", b"h2", b"h3"])
    r = request([b"h0", b"h1", b"h2", b"h3"], 4 * BS)  # whole prompt held: last block computed
    assert c.get_num_new_matched_tokens(r, 0) == (3 * BS, True)  # loaded asynchronously
    assert c.get_num_new_matched_tokens(r, BS) == (2 * BS, True)
    gap = request([b"h0", b"x", b"h2"], 3 * BS + 5)
    assert c.get_num_new_matched_tokens(gap, 0) == (BS, True)
    assert c.get_num_new_matched_tokens(request([b"x"], BS + 1), 0) == (0, False)
    # load plan: the blocks after the local hit, into the request's block ids
    c.get_num_new_matched_tokens(r, BS)
    c.update_state_after_alloc(r, SimpleNamespace(get_block_ids=lambda: ([7, 8, 9, 10],)), 2 * BS)
    (job,) = c.build_connector_meta(None).loads
    assert job.block_ids == [8, 9] and job.keys == [block_key(b"ns", h) for h in (b"h1", b"h2")]


def test_finished_request_saves_only_blocks_not_held_and_holds_its_blocks():
    c = fake_connector([b"h0"])
    r = request([b"h0", b"h1", b"h2"], 3 * BS + 3, computed=3 * BS + 2)
    assert c.request_finished(r, [4, 5, 6, 7]) == (True, None)
    meta = c.build_connector_meta(None)
    (job,) = meta.saves
    assert job.block_ids == [5, 6] and job.starts == [False, False]
    assert meta.accesses == [[block_key(b"ns", h) for h in (b"h0", b"h1", b"h2")]]
    assert c.request_finished(r, [4, 5, 6, 7]) == (False, None)  # in flight: not again
    c.update_connector_output(SimpleNamespace(kv_connector_worker_meta=ColdTierWorkerMetadata(
        {job.keys[0]: 123, job.keys[1]: None})))
    assert job.keys[0] in c.held and job.keys[1] not in c.held
    assert c.request_finished(r, [4, 5, 6, 7])[0]  # the dropped block is saved again


def test_redis_down_is_a_miss_with_a_warning(caplog):
    pytest.importorskip("redis")
    import socket

    from vllm_seqkv.tiers.redis_storage import RedisStorage

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{sock.getsockname()[1]}/0"
    st = store(RedisStorage(url, timeout_s=0.2))
    with caplog.at_level("WARNING"):
        assert not st.save(b"r" * 20, 0)  # worker: save fails, no exception
        assert not st.load(b"r" * 20, 0)  # worker: load misses -> vLLM recomputes
    assert "failed" in caplog.text
    c = ColdTierScheduler(cold_options(kind="redis", url=url), b"ns", BS, probe=st.tier.storage)
    r = request([b"h0", b"h1"], 2 * BS + 1)
    assert c.get_num_new_matched_tokens(r, 0) == (0, False)  # scheduler: nothing to load
    assert c._probe_off_until > 0  # and no probe (timeout) per request for a while


def test_code_level_coder_only_with_a_prior_fitted_for_these_slots(tiny_model_dir, tmp_path):
    from vllm_seqkv.config import SeqKVConfig
    from vllm_seqkv.integration.cold_tier import code_model_for_engine
    from vllm_seqkv.integration.engine_codec import EngineCodec
    from vllm_seqkv.tiers.code_model import CodeModelCodec

    engine = EngineCodec(SeqKVConfig(kv_cache_backend="seqkv", preset="seqkv-3"), str(tiny_model_dir), 2, 32,
                         10000.0)
    fake = SimpleNamespace(config=SimpleNamespace(calibration=str(tmp_path / "cal.safetensors")),
                           model_dir=str(tiny_model_dir), preset="seqkv-3", codec=engine.codec,
                           head_dim=32)
    layers, slot = len(engine.layers()), engine.slot_bytes
    assert code_model_for_engine(fake, layers, 2, slot) is None  # no prior yet
    prior = CodeModelCodec.for_kv_codec(engine.codec, layers, 2, 32, slot)
    prior.save_prior(tmp_path / "cal.cold-prior.npz")
    coder = code_model_for_engine(fake, layers, 2, slot)
    assert coder is not None and coder.tag == prior.tag
    assert code_model_for_engine(fake, layers, 2, slot + 8) is None  # fitted for other slots
    (tmp_path / "cal.cold-prior.npz").write_bytes(b"not a prior")
    assert code_model_for_engine(fake, layers, 2, slot) is None  # damaged: byte-level coder


def test_cold_tier_stats_report_increments_and_aggregate_like_prometheus():
    from vllm_seqkv.integration.connector_metrics import ColdTierStats, StatsDelta

    delta = StatsDelta()
    first = delta.take({"saved_blocks": 3, "loaded_blocks": 0}, {"tier_bytes": 100})
    assert first.data == {"saved_blocks": 3, "tier_bytes": 100}
    second = delta.take({"saved_blocks": 5, "loaded_blocks": 2}, {"tier_bytes": 180})
    assert second.data == {"saved_blocks": 2, "loaded_blocks": 2, "tier_bytes": 180}
    total = ColdTierStats(data=dict(first.data)).aggregate(second)
    assert total.reduce() == {"saved_blocks": 5, "loaded_blocks": 2, "tier_bytes": 180}
    assert ColdTierStats().is_empty() and not total.is_empty()


def test_lru_eviction_sends_no_key_chains():
    c = fake_connector([], eviction="lru")
    c.request_finished(request([b"h0"], BS + 1, computed=BS), [3, 4])
    assert c.build_connector_meta(None).accesses == []


def worker_connector(blocks_held: int):
    from vllm_seqkv.plt.placement import LearnedEviction

    st = store(MemoryStorage(), entropy=False)
    st.tier.capacity_bytes = blocks_held * len(st.tier.coding.encode(b"k" * 20, st.read(0, False)))
    st.tier.held.set_placement(LearnedEviction(BS))
    return ColdTierWorker(cold_options(), BS, st)


def test_worker_hands_key_chains_to_the_tier_placement_before_saving():
    c = worker_connector(blocks_held=3)
    tier = c.store.tier
    chains = [[block_key(b"ns", h) for h in hs] for hs in ([b"s", b"a"], [b"s", b"b"])]
    for chain, blocks in zip(chains, ([0, 1], [0, 2])):
        c.wait_for_save(ColdTierMetadata(
            saves=[BlockJob("r", blocks, chain, starts=[True, False])], accesses=[chain]))
        assert c.saver.flush(30)
    placement = tier.held.placement
    assert placement.now == 2 and {n.hash for n in placement.trie.leaves()} == {
        chains[0][1], chains[1][1]}
    assert len(tier) == 3 and not placement.untracked
    c.wait_for_save(ColdTierMetadata(
        saves=[BlockJob("r", [3], [block_key(b"ns", b"c")], starts=[False])],
        accesses=[[chains[0][0], block_key(b"ns", b"c")]]))
    assert c.saver.close(30)
    assert len(tier) == 3 and chains[0][0] in tier  # a leaf went, never the shared root


# ---- asynchronous loads (the loader thread) ----------------------------------------------
def loading_connector(tier, seed=1):
    """The worker side on ``pages(seed)`` with its saver and loader threads."""
    return ColdTierWorker(cold_options(), BS, BlockStore(tier, pages(seed), SinkTable(1), D),
                          inventory_sent=True)


def load_meta(req_id, block_ids, keys):
    return ColdTierMetadata(loads=[BlockJob(req_id, list(block_ids), list(keys))])


def gate_loads(c, gate, seen):
    """Make the loader thread wait for ``gate`` before each block; record its thread."""
    inner = c.store.load_pages

    def load_pages(key, block):
        seen.append(threading.current_thread().name)
        assert gate.wait(30)
        return inner(key, block)

    c.store.load_pages = load_pages


def same_rows(a, b):
    return a.keys() == b.keys() and all(torch.equal(x, y) for o in a for x, y in zip(a[o], b[o]))


def step(c, finished=()):
    """The worker's end of a step, in vLLM 0.32's order (kv_connector_model_runner_mixin):
    get_finished, then get_block_ids_with_load_errors."""
    _, recving = c.get_finished(set(finished))
    return recving or set(), c.get_block_ids_with_load_errors()


def saved_source(storage, blocks):
    """A store on ``pages(0)`` over ``storage`` whose ``blocks`` (block id -> starts a
    sequence) are saved, a sequence start with sink rows; returns it and the keys."""
    src = store(storage)
    keys = []
    for i, (block, start) in enumerate(blocks.items()):
        if start:
            with_sink(src, block)
        keys.append(bytes([i + 1]) * 20)
        with src.lock:
            assert src.tier.save(keys[-1], src.read(block, start))
    return src, keys


def test_load_runs_on_the_loader_thread_and_is_reported_once_pages_and_sinks_are_in_place():
    src, keys = saved_source(MemoryStorage(), {2: True, 3: False})
    c = loading_connector(src.tier)
    dst = c.store
    with_sink(dst, 5)  # whatever block 5 held before
    stale = [dst.sinks.export(layer, 5) for layer in range(L)]
    before = [p[[5, 1]].clone() for p in dst.pages]
    gate, seen = threading.Event(), []
    gate_loads(c, gate, seen)
    c.start_load_kv(load_meta("r", [5, 1], keys))  # returns at once: the thread waits for the gate
    assert step(c) == (set(), set())  # not reported while loading, nothing written yet
    assert all(torch.equal(p[[5, 1]], b) for p, b in zip(dst.pages, before))
    gate.set()
    assert c.loader.flush(30)
    assert seen == ["seqkv-cold-loader"] * 2
    # the pages are in place, the sink rows not yet: the engine thread installs them
    assert all(torch.equal(dst.pages[layer][5], src.pages[layer][2]) for layer in range(L))
    assert all(same_rows(dst.sinks.export(layer, 5), stale[layer]) for layer in range(L))
    assert step(c) == ({"r"}, set())
    for layer in range(L):
        assert torch.equal(dst.pages[layer][1], src.pages[layer][3])
        restored, exported = dst.sinks.export(layer, 5), src.sinks.export(layer, 2)
        assert restored.keys() == exported.keys() == {0}
        assert all(torch.equal(a, b) for a, b in zip(restored[0], exported[0]))
        assert dst.sinks.export(layer, 1) == {}
    assert step(c) == (set(), set())  # reported once
    assert c.stats["loaded_blocks"] == 2 and c.stats["load_failures"] == 0
    assert c.shutdown() is None


@pytest.mark.parametrize("fault", ["corrupt", "missing"])
def test_failed_block_is_reported_with_finished_recving_and_later_blocks_stay_unwritten(
        tmp_path, fault, caplog):
    src, keys = saved_source(DiskStorage(tmp_path), {0: True, 1: False, 2: False, 3: False})
    bad = tmp_path / f"{keys[1].hex()}.blob"
    if fault == "corrupt":
        data = bytearray(bad.read_bytes())
        data[len(data) // 2] ^= 0x40
        bad.write_bytes(bytes(data))
    else:
        bad.unlink()
    c = loading_connector(DiskTier(tmp_path, src.tier.coding.codec))
    dst = c.store
    before = [p.clone() for p in dst.pages]
    with caplog.at_level("WARNING"):
        c.start_load_kv(load_meta("r", [3, 4, 5, 1], keys))
        reported = {}
        for i in range(200):  # steps until the request is reported
            recving, errors = step(c)
            for b in errors:
                reported.setdefault(b, i)
            if recving:
                assert recving == {"r"}
                break
            time.sleep(0.02)
    assert reported == {4: i, 5: i, 1: i}  # the failed block and every later one, no later
    for layer in range(L):
        assert torch.equal(dst.pages[layer][3], src.pages[layer][0])  # loaded before it
        for b in (4, 5, 1):  # never written
            assert torch.equal(dst.pages[layer][b], before[layer][b])
    assert c.stats["loaded_blocks"] == 1 and c.stats["load_failures"] == 1
    assert f"block 1 of request r missing or corrupt; vLLM recomputes from token {BS}" in caplog.text
    # the scheduler learns the key failed and does not offer it again at once
    meta = c.build_connector_worker_meta()
    assert meta.failed == {keys[1]} and meta.held[keys[1]] is None
    s = fake_connector([])
    s.held = {k: 1 for k in keys}
    s.update_connector_output(SimpleNamespace(finished_recving={"r"}, kv_connector_worker_meta=meta))
    s.key_of = lambda h: h  # the test's keys stand for the block hashes
    r = request(keys, 4 * BS + 1)
    assert s.get_num_new_matched_tokens(r, 0) == (BS, True)  # block 0 only
    c.shutdown()


def test_request_finished_while_loading_skips_the_rest_and_is_reported_for_freeing():
    src, keys = saved_source(MemoryStorage(), {0: True, 1: False, 2: False})
    c = loading_connector(src.tier)
    before = [p.clone() for p in c.store.pages]
    gate, seen = threading.Event(), []
    gate_loads(c, gate, seen)
    c.start_load_kv(load_meta("r", [3, 4, 5], keys))
    deadline = time.time() + 30
    while not seen and time.time() < deadline:  # the thread is inside the first block
        time.sleep(0.01)
    assert step(c, finished={"r"}) == (set(), set())  # aborted: vLLM holds the blocks
    gate.set()
    assert c.loader.flush(30)
    assert step(c) == ({"r"}, set())  # reported: vLLM frees the blocks now
    assert len(seen) == 1 and c.stats["loaded_blocks"] == 1
    for layer in range(L):
        assert torch.equal(c.store.pages[layer][3], src.pages[layer][0])
        assert torch.equal(c.store.pages[layer][4], before[layer][4])
    c.shutdown()
    # scheduler side: a request finished while its load is in flight saves nothing and
    # leaves the freeing to vLLM (finished_recving)
    s = fake_connector([])
    r = request([b"h0", b"h1", b"h2"], 3 * BS + 1)
    assert s.get_num_new_matched_tokens(r, 0) == (0, False)
    s.held = {block_key(b"ns", h): 1 for h in (b"h0", b"h1")}
    assert s.get_num_new_matched_tokens(r, 0) == (2 * BS, True)
    s.update_state_after_alloc(r, SimpleNamespace(get_block_ids=lambda: ([3, 4, 5, 6],)), 2 * BS)
    r.num_computed_tokens = 2 * BS
    assert s.request_finished(r, [3, 4, 5, 6]) == (False, None)
    assert s.build_connector_meta(None).saves == []


def test_shutdown_waits_for_a_pending_load_within_a_bound(monkeypatch, caplog):
    import vllm_seqkv.integration.cold_tier.worker as worker

    src, keys = saved_source(MemoryStorage(), {0: True, 1: False})
    c = loading_connector(src.tier)
    inner = c.store.load_pages

    def slow(key, block):
        time.sleep(0.3)
        return inner(key, block)

    c.store.load_pages = slow
    c.start_load_kv(load_meta("r", [4, 5], keys))
    c.shutdown()  # waits for both blocks
    assert c.stats["loaded_blocks"] == 2 and c.loader.pending == 0
    assert torch.equal(c.store.pages[0][5], src.pages[0][1])
    # a load that does not finish in time: shutdown returns after the bound, with a warning
    c = loading_connector(src.tier)
    gate, seen = threading.Event(), []
    gate_loads(c, gate, seen)
    monkeypatch.setattr(worker, "SHUTDOWN_LOAD_TIMEOUT_S", 0.5)
    c.start_load_kv(load_meta("r", [4, 5], keys))
    t0 = time.time()
    with caplog.at_level("WARNING"):
        c.shutdown()
    assert time.time() - t0 < 10 and "loads still running" in caplog.text
    gate.set()
    assert not c.loader.submit(None)  # closed


def approximate_connector(allowed=2):
    return ColdTierScheduler(cold_options(approximate=SimpleNamespace(salt_prefix="approx:")), b"ns", BS,
                             approx=ApproximateIndex(BS), approx_allowed=allowed)


def finish_and_store(c, hashes, tokens, salt):
    r = request(hashes, len(tokens), computed=len(hashes) * BS, salt=salt, tokens=tokens)
    c.request_finished(r, list(range(len(hashes) + 1)))
    (job,) = c.build_connector_meta(None).saves
    c.update_connector_output(SimpleNamespace(kv_connector_worker_meta=ColdTierWorkerMetadata(
        {k: 100 for k in job.keys})))
    return job.keys


def test_opted_in_request_loads_a_near_match_of_its_tenants_exact_blocks():
    c = approximate_connector(allowed=2)
    source = list(range(100, 100 + 3 * BS + 1))
    keys = finish_and_store(c, [b"s0", b"s1", b"s2"], source, "t1")
    near = list(source)
    near[3], near[BS + 2] = 7, 8  # one substitution in each of blocks 0 and 1
    own = [b"n0", b"n1", b"n2"]  # its own hashes (its own salt): nothing held under them
    r = request(own, len(near), salt="approx:t1", tokens=near)
    assert c.get_num_new_matched_tokens(r, 0) == (3 * BS, True)
    c.update_state_after_alloc(r, SimpleNamespace(get_block_ids=lambda: ([5, 6, 7, 8],)), 3 * BS)
    (job,) = c.build_connector_meta(None).loads
    assert job.block_ids == [5, 6, 7] and job.keys == keys  # the source's blocks
    assert c.get_kv_connector_stats().data == {"approx_requests": 1, "approx_blocks": 3}
    assert c.get_kv_connector_stats().is_empty()  # increments: nothing new
    # no opt-in, another tenant, or a local hit already: exact reuse only
    assert c.get_num_new_matched_tokens(request(own, len(near), salt="t1", tokens=near), 0) == (0, False)
    assert c.get_num_new_matched_tokens(request(own, len(near), salt="approx:t2", tokens=near), 0) == (0, False)
    assert c.get_num_new_matched_tokens(r, BS) == (0, False)
    # beyond the gate's budget the match stops before the block of the third substitution
    far = list(near)
    far[2 * BS + 5] = 9
    assert c.get_num_new_matched_tokens(request(own, len(far), salt="approx:t1", tokens=far), 0) == (2 * BS, True)


def test_approximately_served_blocks_are_never_a_near_match_source_and_dropped_keys_are_forgotten():
    c = approximate_connector(allowed=4)
    source = list(range(200, 200 + 2 * BS + 1))
    keys = finish_and_store(c, [b"s0", b"s1"], source, "t1")
    near = list(source)
    near[0] = 1
    finish_and_store(c, [b"n0", b"n1"], near, "approx:t1")  # an opted-in request's own blocks
    assert len(c.approx) == 2  # only the exact source's
    c.update_connector_output(SimpleNamespace(kv_connector_worker_meta=ColdTierWorkerMetadata(
        {keys[1]: None})))  # the tier dropped the source's second block
    other = list(near)
    other[0] = 2  # not the opted-in request: its own hashes hold nothing
    r = request([b"m0", b"m1"], len(other), salt="approx:t1", tokens=other)
    assert c.get_num_new_matched_tokens(r, 0) == (BS, True)
    assert len(c.approx) == 1


def test_scheduler_side_reports_no_stats_without_approximate_reuse():
    assert fake_connector([]).get_kv_connector_stats() is None


def test_gate_measured_for_another_model_is_refused_at_start_up(tmp_path, caplog):
    from vllm_seqkv.config import ApproximateReuseConfig
    from vllm_seqkv.integration.cold_tier import approximate_reuse_for
    from vllm_seqkv.plt.approximate import QualityGate

    QualityGate("SmolLM2-135M-Instruct", {1: 0.001, 2: 0.01}).save(tmp_path / "g.json")
    cfg = ApproximateReuseConfig(gate=str(tmp_path / "g.json"), max_kl=0.005)
    served = lambda model: SimpleNamespace(model_config=SimpleNamespace(model=model))  # noqa: E731
    with pytest.raises(ValueError, match="measured for model 'SmolLM2-135M-Instruct', not 'tiny'"):
        approximate_reuse_for(served("/models/tiny"), cfg, BS)
    index, allowed = approximate_reuse_for(served("/models/smollm2-135m-instruct"), cfg, BS)
    assert isinstance(index, ApproximateIndex) and allowed == 1
    assert approximate_reuse_for(served("x"), None, BS) == (None, 0)
