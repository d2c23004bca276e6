"""Causal attention over a cache whose older part is read through a KV codec.

Decode-path semantics, for a sequence at positions ``0..T-1`` and a codec ``c``: token ``t``
reads cached position ``j < t`` from the *decoded* (encode -> decode) K/V when
``sink_tokens <= j < c.exact_window_start(t)``, and exactly otherwise (the exact recent /
current-block window and the sink tokens). Its own K/V (``j == t``) is always exact.

All tokens are computed at once (no per-token loop), in chunks of query rows: scores
against the coded keys, then the few exact columns of the chunk (sinks and the band
``[min exact_window_start, last row]``) are recomputed against the exact keys and mixed in
by the ``[T, T]`` read mask; values are read as ``P @ V_coded + (P * exact) @ (V - V_coded)``
over the exact columns.
"""

from __future__ import annotations

import torch

from vllm_seqkv.codec.base import KVCodec

QUERY_CHUNK = 256


def coded_read_mask(codec: KVCodec, length: int) -> torch.Tensor:
    """``[T, T]`` bool: ``mask[t, j]`` is True where token ``t`` reads position ``j`` coded."""
    starts = torch.tensor([codec.exact_window_start(t) for t in range(length)])
    cols = torch.arange(length)
    mask = (cols[None, :] < starts[:, None]) & (cols[None, :] >= codec.sink_tokens)
    mask &= cols[None, :] < torch.arange(length)[:, None]
    return mask


def check_causal(codec: KVCodec, length: int) -> None:
    """Refuse codecs whose coded reads touch a block that is not complete yet.

    A block codec (``block_size > 1``) can code a block only once all its tokens exist: token
    ``t`` may read position ``j`` coded only if ``j``'s block ends before ``t``.
    """
    size = codec.block_size
    if size <= 1:
        return
    for t in range(length):
        start = min(codec.exact_window_start(t), t)
        if start > max(codec.sink_tokens, 0) and ((start - 1) // size + 1) * size > t:
            raise ValueError(
                f"codec {codec.name!r}: token {t} would read a partially filled {size}-token block "
                "through the codec; set block_exact or exact_recent >= block_size - 1"
            )


def _group_queries(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``q [T, H, D]`` -> ``[H_kv, group, T, D]``: each kv head serves ``group`` query heads."""
    length, heads, dim = q.shape
    return q.view(length, kv_heads, heads // kv_heads, dim).permute(1, 2, 0, 3)


def _causal_mask(scores: torch.Tensor, rows: slice) -> torch.Tensor:
    """Set ``scores [..., t, r1]`` of future positions (``j > row``) to ``-inf``."""
    causal = torch.arange(rows.stop)[None, :] <= torch.arange(rows.start, rows.stop)[:, None]
    return scores.masked_fill(~causal, float("-inf"))


def _causal_scores(qc: torch.Tensor, key_t: torch.Tensor, rows: slice, scale: float) -> torch.Tensor:
    """``qc [H_kv, g, t, D]`` x ``key_t [H_kv, D, r1]`` -> masked scores ``[H_kv, g, t, r1]``."""
    return _causal_mask(torch.matmul(qc, key_t[:, None]) * scale, rows)


def attention(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              coded_key: torch.Tensor | None = None, coded_value: torch.Tensor | None = None,
              coded_mask: torch.Tensor | None = None, sink_tokens: int = 0,
              exact_rows: int = 0):
    """Causal GQA attention for one sequence starting at position 0.

    Shapes: ``q [T, H, D]``; ``key, value, coded_key, coded_value [T, H_kv, D]``;
    ``coded_mask [T, T]`` bool from :func:`coded_read_mask`, or None (all exact).
    Returns ``out [T, H, D]``; with ``exact_rows > 0`` also the fully exact output of the last
    ``exact_rows`` queries, ``[exact_rows, H, D]`` (to measure the attention-output error).
    """
    length, heads, dim = q.shape
    kv_heads = key.shape[1]
    scale = dim ** -0.5
    qg = _group_queries(q, kv_heads)
    key_t, val = key.permute(1, 2, 0), value.permute(1, 0, 2)  # [H_kv, D, T], [H_kv, T, D]
    coded = coded_mask is not None and bool(coded_mask.any())
    if coded:
        ckey_t, cval = coded_key.permute(1, 2, 0), coded_value.permute(1, 0, 2)
        val_fix = val - cval
    outs = []
    for start in range(0, length, QUERY_CHUNK):
        rows = slice(start, min(start + QUERY_CHUNK, length))
        qc = qg[:, :, rows]
        if not coded:
            probs = _causal_scores(qc, key_t[..., : rows.stop], rows, scale).softmax(-1)
            outs.append(torch.matmul(probs, val[:, None, : rows.stop]))
            continue
        mask = coded_mask[rows, : rows.stop]  # [t, r1]
        band_lo = int((~mask[:, sink_tokens:]).float().argmax(-1).min()) + sink_tokens
        exact_cols = torch.cat([torch.arange(min(sink_tokens, band_lo)), torch.arange(band_lo, rows.stop)])
        scores = torch.matmul(qc, ckey_t[:, None, :, : rows.stop]) * scale
        exact_scores = torch.matmul(qc, key_t[:, None, :, exact_cols]) * scale
        col_mask = mask[:, exact_cols]
        scores[..., exact_cols] = torch.where(col_mask, scores[..., exact_cols], exact_scores)
        probs = _causal_mask(scores, rows).softmax(-1)
        out = torch.matmul(probs, cval[:, None, : rows.stop])
        out += torch.matmul(probs[..., exact_cols] * ~col_mask, val_fix[:, None, exact_cols])
        outs.append(out)
    out = torch.cat(outs, dim=2).permute(2, 0, 1, 3).reshape(length, heads, dim)
    if exact_rows <= 0:
        return out
    rows = slice(length - exact_rows, length)
    probs = _causal_scores(qg[:, :, rows], key_t, rows, scale).softmax(-1)
    exact = torch.matmul(probs, val[:, None]).permute(2, 0, 1, 3).reshape(exact_rows, heads, dim)
    return out, exact
