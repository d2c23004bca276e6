"""Parts of the cold-tier connector without an engine: block records, sink rows, keys, plans."""

from types import SimpleNamespace

import pytest
import torch

from vllm_seqkv.integration.connector import (
    BlockStore,
    ColdTierWorkerMetadata,
    SeqKVColdTierConnector,
    block_key,
)
from vllm_seqkv.integration.engine_codec import SinkTable
from vllm_seqkv.plt.tiers import DiskTier, MemoryTier

L, NB, H, BS, S, D = 3, 6, 2, 16, 12, 8


def pages(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (NB, H, BS, S), dtype=torch.uint8, generator=g) for _ in range(L)]


def store(tier, seed=0, entropy=True):
    sinks = SinkTable(1)
    codec = BlockStore.codec_for(L, H, BS, S, entropy)
    tier.codec = codec
    return BlockStore(tier, pages(seed), sinks, D)


def with_sink(st, block):
    for layer in range(L):
        k, v = torch.randn(H, D), torch.randn(H, D)
        st.sinks.record(layer, torch.tensor([block]), torch.tensor([0]), torch.tensor([0]),
                        k[None], v[None])


@pytest.mark.parametrize("entropy", [True, False])
def test_block_and_its_sink_rows_move_to_another_block_id(entropy):
    src = store(MemoryTier(), 0, entropy)
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
    src = store(MemoryTier())
    src.save(b"a" * 20, 1)  # block 1 starts no sequence: no sink rows
    dst = BlockStore(src.tier, pages(1), SinkTable(1), D)
    with_sink(dst, 3)
    assert dst.load(b"a" * 20, 3)
    assert all(dst.sinks.export(layer, 3) == {} for layer in range(L))


def test_corrupt_blob_is_a_miss_and_leaves_the_pages(tmp_path):
    src = store(DiskTier(tmp_path))
    src.save(b"c" * 20, 0)
    (path,) = tmp_path.glob("*.blob")
    data = bytearray(path.read_bytes())
    data[-3] ^= 1
    path.write_bytes(bytes(data))
    dst = BlockStore(DiskTier(tmp_path, src.tier.codec), pages(1), SinkTable(1), D)
    before = [p[4].clone() for p in dst.pages]
    assert not dst.load(b"c" * 20, 4)
    assert all(torch.equal(p[4], b) for p, b in zip(dst.pages, before))
    assert dst.tier.take_dropped() == [b"c" * 20] and not list(tmp_path.glob("*.blob"))


def test_keys_depend_on_namespace_and_hash():
    assert block_key(b"n1", b"h") != block_key(b"n2", b"h") != block_key(b"n1", b"g")


def fake_connector(held, eviction="plt"):
    c = SeqKVColdTierConnector.__new__(SeqKVColdTierConnector)
    c.block_size, c.ns, c._probe, c._probe_off_until = BS, b"ns", None, 0.0
    c.cold = SimpleNamespace(kind="cpu", eviction=eviction)
    c._held = {block_key(b"ns", h): 100 for h in held}
    c._saving, c._lookup_start, c._saves, c._loads, c._accesses = set(), {}, [], [], []
    return c


def request(hashes, num_tokens, computed=0):
    return SimpleNamespace(request_id="r", block_hashes=hashes, num_tokens=num_tokens,
                           num_computed_tokens=computed)


def test_match_counts_held_blocks_after_the_local_hit_and_leaves_one_token():
    c = fake_connector([b"h0", b"h1", b"h2", b"h3"])
    r = request([b"h0", b"h1", b"h2", b"h3"], 4 * BS)  # whole prompt held: last block computed
    assert c.get_num_new_matched_tokens(r, 0) == (3 * BS, False)
    assert c.get_num_new_matched_tokens(r, BS) == (2 * BS, False)
    gap = request([b"h0", b"x", b"h2"], 3 * BS + 5)
    assert c.get_num_new_matched_tokens(gap, 0) == (BS, False)
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
    assert job.keys[0] in c._held and job.keys[1] not in c._held and not c._saving


def test_redis_down_is_a_miss_with_a_warning(caplog):
    pytest.importorskip("redis")
    import socket

    from vllm_seqkv.plt.tiers import RedisTier

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{sock.getsockname()[1]}/0"
    st = store(RedisTier(url, timeout_s=0.2))
    with caplog.at_level("WARNING"):
        assert not st.save(b"r" * 20, 0)  # worker: save fails, no exception
        assert not st.load(b"r" * 20, 0)  # worker: load misses -> vLLM recomputes
    assert "failed" in caplog.text
    c = fake_connector([])
    c._probe, c.cold = st.tier, SimpleNamespace(kind="redis", url=url)
    r = request([b"h0", b"h1"], 2 * BS + 1)
    assert c.get_num_new_matched_tokens(r, 0) == (0, False)  # scheduler: nothing to load
    assert c._probe_off_until > 0  # and no probe (timeout) per request for a while


def test_code_level_coder_only_with_a_prior_fitted_for_these_slots(tiny_model_dir, tmp_path):
    from vllm_seqkv.config import SeqKVConfig
    from vllm_seqkv.integration.connector import code_model_for_engine
    from vllm_seqkv.integration.engine_codec import EngineCodec
    from vllm_seqkv.plt.code_model import CodeModelCodec

    engine = EngineCodec(SeqKVConfig(kv_cache_backend="seqkv"), str(tiny_model_dir), 2, 32, 10000.0)
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


def worker_connector(tier, blocks_held: int):
    from vllm_seqkv.plt.placement import LearnedEviction
    from vllm_seqkv.plt.tiers import BackgroundSaver

    st = store(tier, entropy=False)
    tier.capacity_bytes = blocks_held * len(tier.encode(b"k" * 20, st.read(0, False)))
    tier.set_placement(LearnedEviction(BS))
    c = fake_connector([])
    c.store, c.saver = st, BackgroundSaver(tier, st.lock, 1 << 30)
    c._changed, c._done_sending = set(), set()
    c.stats = {"saves_dropped": 0, "copy_s": 0.0}
    return c


def test_worker_hands_key_chains_to_the_tier_placement_before_saving():
    from vllm_seqkv.integration.connector import BlockJob, ColdTierMetadata

    tier = MemoryTier()
    c = worker_connector(tier, blocks_held=3)
    chains = [[block_key(b"ns", h) for h in hs] for hs in ([b"s", b"a"], [b"s", b"b"])]
    for chain, blocks in zip(chains, ([0, 1], [0, 2])):
        c._connector_metadata = ColdTierMetadata(
            saves=[BlockJob("r", blocks, chain, starts=[True, False])], accesses=[chain])
        c.wait_for_save()
        assert c.saver.flush(30)
    placement = tier.placement
    assert placement.now == 2 and {n.hash for n in placement.trie.leaves()} == {
        chains[0][1], chains[1][1]}
    assert len(tier) == 3 and not placement.untracked
    c._connector_metadata = ColdTierMetadata(
        saves=[BlockJob("r", [3], [block_key(b"ns", b"c")], starts=[False])],
        accesses=[[chains[0][0], block_key(b"ns", b"c")]])
    c.wait_for_save()
    assert c.saver.close(30)
    assert len(tier) == 3 and chains[0][0] in tier  # a leaf went, never the shared root
