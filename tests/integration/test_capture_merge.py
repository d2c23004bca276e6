"""Tensor-parallel merge of the vLLM capture: per-rank heads back in global order."""

import torch

from vllm_seqkv.integration.capture import _global_heads, _merge_heads, _merge_ranks


def _layouts(size, kv_total, q_total):
    kv_local = max(1, kv_total // size)
    return [{"rank": r, "size": size, "kv_heads": kv_local, "group": q_total // size // kv_local,
             "total_kv_heads": kv_total} for r in range(size)]


def _split(global_q_sq, global_wo, layouts, q_total, dim):
    """What each rank computes: mean E[q²] over its local query heads per local KV head, and
    Σ W_o^T W_o over them (``global_q_sq [L, Hq, D]`` per query head, ``global_wo [L, Hq, D, D]``)."""
    finals = []
    size = layouts[0]["size"]
    per_rank = q_total // size
    for layout in layouts:
        heads = range(layout["rank"] * per_rank, (layout["rank"] + 1) * per_rank)
        q = global_q_sq[:, list(heads)].view(global_q_sq.shape[0], layout["kv_heads"], layout["group"], dim)
        w = global_wo[:, list(heads)].view(global_wo.shape[0], layout["kv_heads"], layout["group"], dim, dim)
        finals.append({"query_sq": q.mean(2), "value_metric": w.sum(2)})
    return finals


def test_split_kv_heads_come_back_in_global_order():
    layouts = _layouts(size=2, kv_total=4, q_total=8)
    assert [_global_heads(x) for x in layouts] == [[0, 1], [2, 3]]
    keys = torch.randn(5, 4, 3)
    parts = [keys[:, :2], keys[:, 2:]]
    assert torch.equal(_merge_heads(parts, layouts), keys)


def test_replicated_kv_heads_are_taken_once_and_their_query_groups_pooled():
    layers, dim, q_total = 2, 3, 8
    layouts = _layouts(size=4, kv_total=2, q_total=q_total)
    assert [_global_heads(x) for x in layouts] == [[0], [0], [1], [1]]
    keys = torch.randn(5, 2, dim)
    parts = [keys[:, [0]], keys[:, [0]], keys[:, [1]], keys[:, [1]]]
    assert torch.equal(_merge_heads(parts, layouts), keys)
    q_sq = torch.rand(layers, q_total, dim, dtype=torch.float64)
    wo = torch.randn(layers, q_total, dim, dim, dtype=torch.float64)
    query, metric = _merge_ranks(_split(q_sq, wo, layouts, q_total, dim), layouts)
    expected_q = q_sq.view(layers, 2, 4, dim).mean(2)  # 4 query heads per KV head
    expected_w = wo.view(layers, 2, 4, dim, dim).sum(2)
    assert torch.allclose(query, expected_q) and torch.allclose(metric, expected_w)
