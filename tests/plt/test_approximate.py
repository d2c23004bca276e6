"""Approximate prefix reuse: near matches within a substitution budget, and the quality gate."""

import pytest

from vllm_seqkv.plt.approximate import ApproximateIndex, QualityGate, near_match
from vllm_seqkv.plt.trie import PrefixTrie

BS = 4


def trie_with(*seqs, salt="t"):
    trie = PrefixTrie(BS)
    for s in seqs:
        trie.insert(s, salt)
    return trie


def test_exact_prefix_needs_no_budget_and_matches_match_prefix():
    a = list(range(12))
    trie = trie_with(a)
    m = near_match(trie, a + [99], "t", 0)
    assert m.exact and m.num_tokens == 12
    assert [n.hash for n in m.nodes] == trie.match_prefix(a, "t", touch=False).hashes


def test_substitutions_within_budget_are_reported_by_position():
    a = list(range(12))
    b = list(a)
    b[2], b[9] = 50, 60  # one difference in block 0, one in block 2
    trie = trie_with(a)
    assert near_match(trie, b, "t", 0).num_tokens == 0
    assert near_match(trie, b, "t", 1).num_tokens == 8  # block 2 would need a second one
    m = near_match(trie, b, "t", 2)
    assert m.num_tokens == 12 and m.substitutions == [2, 9] and not m.exact


def test_prefers_the_closest_sibling_and_never_crosses_tenants():
    base = [1, 2, 3, 4]
    trie = trie_with(base + [5, 6, 7, 8], base + [5, 6, 0, 0])
    m = near_match(trie, base + [5, 6, 7, 9], "t", 2)
    assert m.nodes[-1].tokens == (5, 6, 7, 8) and m.substitutions == [7]
    assert near_match(trie, base + [5, 6, 7, 8], "other-tenant", 4).num_tokens == 0
    with pytest.raises(ValueError):
        near_match(trie, base, "t", -1)


def test_gate_allows_up_to_the_last_k_within_budget(tmp_path):
    gate = QualityGate("m", {1: 0.001, 2: 0.004, 4: 0.02, 8: 0.003})
    assert gate.max_substitutions(0.01) == 2  # 8 is within budget but 4 is not: stop at 2
    assert gate.max_substitutions(0.0005) == 0
    assert gate.max_substitutions(1.0) == 8
    gate.save(tmp_path / "g.json")
    assert QualityGate.load(tmp_path / "g.json") == gate


def test_index_matches_through_held_keys_and_forgets_dropped_leaves():
    index = ApproximateIndex(BS)
    a = list(range(12))
    keys = [b"k0", b"k1", b"k2"]
    index.insert(a + [5], "t", keys)
    b = list(a)
    b[5] = 99
    found, got = index.match(b, "t", 1, held=lambda k: True)
    assert got == keys and found.substitutions == [5]
    found, got = index.match(b, "t", 1, held=lambda k: k != b"k1")
    assert got == [b"k0"] and found.substitutions == [] and found.num_tokens == BS
    assert index.match(b, "u", 1, held=lambda k: True)[1] == []  # tenants stay apart
    index.forget(b"k1")  # an inner block: the trie keeps it for its child, unmatched
    assert len(index) == 2 and len(index.trie) == 3
    index.forget(b"k2")  # the leaf goes, and the inner block left without a key with it
    assert len(index) == 1 and len(index.trie) == 1
    assert index.match(b, "t", 1, held=lambda k: True)[1] == [b"k0"]
    index.forget(b"unknown")  # a key never indexed: nothing to do


def test_index_beyond_its_bound_drops_its_oldest_leaves():
    index = ApproximateIndex(BS, max_blocks=3)
    a, b = list(range(8)), list(range(100, 108))
    index.insert(a, "t", [b"a0", b"a1"])
    index.insert(b, "t", [b"b0", b"b1"])  # one block too many: a's leaf goes
    assert len(index.trie) == 3 and len(index) == 3
    assert index.match(a, "t", 0, held=lambda k: True)[1] == [b"a0"]
    assert index.match(b, "t", 0, held=lambda k: True)[1] == [b"b0", b"b1"]
    index.insert(a, "t", [b"a0", b"a1"])  # a's block back; b's leaf (now the oldest) goes
    assert index.match(a, "t", 0, held=lambda k: True)[1] == [b"a0", b"a1"]
    assert index.match(b, "t", 0, held=lambda k: True)[1] == [b"b0"]
