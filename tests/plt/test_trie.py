import math

import numpy as np
import pytest

from vllm_seqkv.plt import PrefixTrie


def toks(n, seed=0):
    return np.random.default_rng(seed).integers(0, 1000, n).tolist()


def test_insert_match_evict_pair():
    t = PrefixTrie(block_size=4)
    a = toks(18)
    path = t.insert(a, "s")
    assert len(path) == 4 and len(t) == 4  # partial last block not cached
    m = t.match_prefix(a, "s")
    assert m.num_tokens == 16 and m.hashes == [n.hash for n in path]
    b = a[:9] + [5000] * 8  # diverges inside block 3
    assert t.match_prefix(b, "s").num_tokens == 8
    assert t.can_insert(b, "s") == 2
    with pytest.raises(ValueError):
        t.evict(path[0].hash)  # inner node
    t.evict(path[-1].hash)
    assert t.match_prefix(a, "s").num_tokens == 12
    for n in reversed(path[:-1]):
        t.evict(n.hash)
    assert len(t) == 0 and t.match_prefix(a, "s").num_tokens == 0


def test_hit_statistics():
    t = PrefixTrie(block_size=2)
    a = toks(8)
    t.insert(a, "")
    t.match_prefix(a, "")
    t.match_prefix(a[:4] + [7, 7, 7, 7], "")
    hits = [n.hits for n in t.match_prefix(a, "", touch=False).nodes]
    assert hits == [2, 2, 1, 1]
    assert t.hit_tokens == 8 + 4 and t.lookup_tokens == 16
    assert t.hit_rate == pytest.approx(12 / 16)


def test_tenant_isolation():
    t = PrefixTrie(block_size=4)
    a = toks(16)
    pa = t.insert(a, "alice")
    assert t.match_prefix(a, "bob").num_tokens == 0
    pb = t.insert(a, "bob")
    assert {n.hash for n in pa}.isdisjoint(n.hash for n in pb)
    t.evict(pb[-1].hash)
    assert t.match_prefix(a, "alice").num_tokens == 16
    assert t.match_prefix(a, "bob").num_tokens == 12
    assert t.match_prefix(a, "").num_tokens == 0


def test_distance_is_information_of_common_prefix():
    t = PrefixTrie(block_size=4)
    rng = np.random.default_rng(1)
    a = toks(12, 2)
    lp = np.log(rng.uniform(0.05, 0.9, 12))
    t.insert(a, "x", logprobs=lp)
    b = a[:6] + [9999] * 6
    want = -lp[:6].sum() / math.log(2)
    assert t.distance(a, b, "x") == pytest.approx(want)
    assert t.distance(a, a, "x") == pytest.approx(-lp.sum() / math.log(2))
    assert t.distance(a, [a[0] + 1] + a[1:], "x") == 0.0
    assert t.match_prefix(a, "x").nodes[0].info_bits == pytest.approx(-lp[:4].sum() / math.log(2))
    with pytest.raises(LookupError):
        t.distance(a, b, "other-tenant")
    t2 = PrefixTrie(block_size=4)
    t2.insert(a, "x")  # no log-probs given
    with pytest.raises(LookupError):
        t2.distance(a, b, "x")


def test_edge_logprobs_read_vllm_prompt_logprobs_by_token():
    from types import SimpleNamespace

    from vllm_seqkv.plt.trie import edge_logprobs

    ids = [5, 7, 9]
    lps = [None, {7: SimpleNamespace(logprob=-0.5), 3: SimpleNamespace(logprob=-0.1)},
           {9: SimpleNamespace(logprob=-2.0)}]
    assert edge_logprobs(ids, lps).tolist() == [0.0, -0.5, -2.0]
    assert edge_logprobs(ids, lps, first=-8.0)[0] == -8.0
    with pytest.raises(ValueError, match="2 prompt log-probabilities for 3 tokens"):
        edge_logprobs(ids, lps[:2])
    with pytest.raises(ValueError, match="no log-probability at position 2"):
        edge_logprobs(ids, lps[:2] + [None])
