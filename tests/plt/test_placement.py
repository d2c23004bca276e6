"""The learned eviction of a cold tier: key trie, victims, and the connector-call replay."""

import pytest

from vllm_seqkv.plt.placement import KeyTrie, LearnedEviction
from benchmarks.replay import key_chain, replay
from vllm_seqkv.tiers import MemoryTier
from vllm_seqkv.tiers.blob import BlobCodec
from vllm_seqkv.tiers.coders import RawCodec
from benchmarks.traces import TraceConfig, generate

BLOCK = bytes(64)


def k(name: str) -> bytes:
    return name.encode().ljust(16, b".")


def test_key_trie_records_chains_and_evicts_leaves_only():
    t = KeyTrie(16, clock=lambda: 0)
    a = t.record([k("a"), k("b"), k("c")])
    t.record([k("a"), k("b"), k("d")])
    assert [n.depth for n in a] == [1, 2, 3] and len(t) == 4
    assert {n.hash for n in t.leaves()} == {k("c"), k("d")}
    with pytest.raises(ValueError, match="leaves"):
        t.evict(k("b"))
    t.evict(k("c"))
    t.evict(k("d"))
    assert {n.hash for n in t.leaves()} == {k("b")}


def blob_bytes() -> int:
    return len(BlobCodec(RawCodec()).encode(k("x"), BLOCK))


def tier_with_placement(blocks: int) -> MemoryTier:
    tier = MemoryTier(capacity_bytes=blocks * blob_bytes())
    tier.held.set_placement(LearnedEviction(16))
    return tier


def save_chain(tier, names):
    chain = [k(n) for n in names]
    tier.held.placement.access(chain)
    for key in reversed(chain):
        if key not in tier:
            tier.save(key, BLOCK)


def test_full_tier_never_drops_a_prefix_before_its_extensions():
    tier = tier_with_placement(4)
    save_chain(tier, ["s", "a1", "a2"])
    save_chain(tier, ["s", "b1", "b2"])  # 5 blocks for 4 slots: a leaf goes
    assert len(tier) == 4 and k("s") in tier
    for _ in range(5):
        save_chain(tier, ["s", "c1"])
        held = set(tier.held.keys())
        for parent, child in (("a1", "a2"), ("b1", "b2")):
            assert k(child) not in held or k(parent) in held


def test_blocks_no_chain_named_go_first(tmp_path):
    tier = MemoryTier(capacity_bytes=3 * blob_bytes())
    tier.save(k("old"), BLOCK)  # e.g. left on disk by a previous engine
    tier.held.set_placement(LearnedEviction(16))
    save_chain(tier, ["s", "a"])
    save_chain(tier, ["s", "b"])
    assert k("old") not in tier and len(tier) == 3


def test_corrupt_block_is_forgotten_by_the_placement():
    tier = tier_with_placement(8)
    save_chain(tier, ["s", "a"])
    tier.storage.put(k("a"), b"garbage")
    assert tier.load(k("a")) is None
    assert k("a") not in tier.held.placement.trie and k("a") not in tier


@pytest.fixture(scope="module")
def trace():
    return generate(TraceConfig(requests=400, seed=5))


def test_replay_respects_capacity_and_the_infinite_cache_bound(trace):
    inf = replay(trace, 100, 10**9, "lru")
    assert inf.evictions == 0
    for eviction in ("lru", "plt"):
        r = replay(trace, 100, 200, eviction)
        assert r.evictions > 0 and 0 < r.hit_rate <= inf.hit_rate
    with pytest.raises(ValueError, match="plt or lru"):
        replay(trace, 100, 200, "fifo")


def test_learned_eviction_beats_lru_when_the_tier_is_as_small_as_the_hot_cache(trace):
    # an LRU tier of the hot cache's size mostly holds what the hot cache holds
    lru = replay(trace, 150, 150, "lru")
    plt = replay(trace, 150, 150, "plt")
    assert plt.cold_tokens > 2 * lru.cold_tokens and plt.hit_rate > lru.hit_rate


def test_key_chain_folds_the_tenant():
    toks = list(range(40))
    assert len(key_chain("a", toks, 16)) == 2
    assert key_chain("a", toks, 16)[0] != key_chain("b", toks, 16)[0]


def test_sampled_victims_are_held_leaves_outside_the_current_chain():
    tier = MemoryTier(capacity_bytes=12 * blob_bytes())
    tier.held.set_placement(LearnedEviction(16, sample=2, seed=1))
    for i in range(30):
        save_chain(tier, ["s", f"a{i % 7}", f"b{i}"])
        held = set(tier.held.keys())
        assert len(held) <= 12 and {k("s"), k(f"a{i % 7}"), k(f"b{i}")} <= held
        t = tier.held.placement.trie
        parents = {t.get(key).parent for key in held} - {t.root}
        assert all(p.hash in held for p in parents)  # no prefix goes before its extensions
        assert sorted(n.hash for n in t.leaves()) == sorted(
            key for key in t._by_key if t.get(key).is_leaf)


def test_replay_cli_records_the_seed_and_the_single_cache_bounds(tmp_path):
    import json

    from benchmarks.replay import main

    out = tmp_path / "plt.json"
    out.write_text(json.dumps({"kept": 1}))
    args = ["--requests", "80", "--hot-blocks", "20", "--cold-blocks", "40", "--out", str(out)]
    assert main(args + ["--seed", "3", "--sim"]) == 0
    data = json.loads(out.read_text())
    record = data["connector_eviction"]
    assert data["kept"] == 1 and record["seed"] == 3 and len(record["results"]) == 1
    for row in record["single_cache"]:
        assert row["hit_rate_lru"] <= row["hit_rate_oracle"] and row["hit_rate_plt"] <= row["hit_rate_oracle"]
    main(args)
    other = json.loads(out.read_text())["connector_eviction"]
    assert other["seed"] == 0 and "single_cache" not in other
    assert other["results"][0]["hit_rate_lru"] != record["results"][0]["hit_rate_lru"]  # another trace
