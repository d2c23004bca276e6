"""Causal attention over a cache whose older part is read through a KV codec.

Decode-path semantics, for a sequence at positions ``0..T-1`` and a codec ``c``: token ``t``
reads cached position ``j < t`` from the *decoded* (encode -> decode) K/V when
``sink_tokens <= j < c.exact_window_start(t)``, and exactly otherwise (the exact recent /
current-block window and the sink tokens). Its own K/V (``j == t``) is always exact.

On a sliding-window layer (``window`` W, vLLM's ``sliding_window``: the query's own position
counts) token ``t`` attends to ``t - W < j <= t`` only, the rule of vLLM's attention backends
and of the served path, which reads each sequence from the first position its queries
attend to (``integration/backend.py``: earlier blocks may be freed, and so are never read).
As there, the sink tokens are read exactly only by a token whose window starts at position
0 (``t < W``); a later window that still holds some of them reads them through the codec.

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


def read_starts(codec: KVCodec, length: int) -> torch.Tensor:
    """``[T]`` long: token ``t`` reads positions ``sink_tokens <= j < starts[t]`` coded, the rest
    exactly (``starts[t] <= t``: its own K/V is always exact)."""
    return torch.tensor([min(codec.exact_window_start(t), t) for t in range(length)])


def coded_read_mask(codec: KVCodec, length: int) -> torch.Tensor:
    """``[T, T]`` bool: ``mask[t, j]`` is True where token ``t`` reads position ``j`` coded."""
    cols = torch.arange(length)
    return (cols[None, :] < read_starts(codec, length)[:, None]) & (cols[None, :] >= codec.sink_tokens)


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


def _mask_unseen_(scores: torch.Tensor, rows: slice, first_col: int, window: int | None = None) -> None:
    """In place: ``scores [..., t, n]`` holds columns ``first_col..first_col+n-1`` of query rows
    ``rows``; set the ones a row does not attend to (``j > row``, and with a sliding
    ``window`` also ``j <= row - window``) to ``-inf``."""
    cols = torch.arange(first_col, first_col + scores.shape[-1])
    row = torch.arange(rows.start, rows.stop)[:, None]
    unseen = cols[None, :] > row
    if window is not None:
        unseen |= cols[None, :] <= row - window
    scores.masked_fill_(unseen, float("-inf"))


def _exact_chunk(qc: torch.Tensor, key_t: torch.Tensor, val: torch.Tensor, rows: slice, scale: float,
                 window: int | None = None) -> torch.Tensor:
    """Exact causal attention of query rows ``rows``: ``qc [H_kv, g, t, D]`` -> ``[H_kv, g, t, D]``."""
    scores = torch.matmul(qc * scale, key_t[:, None, :, : rows.stop])
    if window is None:
        _mask_unseen_(scores[..., rows.start :], rows, rows.start)
    else:
        _mask_unseen_(scores, rows, 0, window)
    return torch.matmul(scores.softmax(-1), val[:, None, : rows.stop])


def attention(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              coded_key: torch.Tensor | None = None, coded_value: torch.Tensor | None = None,
              starts: torch.Tensor | None = None, sink_tokens: int = 0, exact_rows: int = 0,
              window: int | None = None):
    """Causal GQA attention for one sequence starting at position 0.

    Shapes: ``q [T, H, D]``; ``key, value, coded_key, coded_value [T, H_kv, D]``; ``starts
    [T]`` from :func:`read_starts`, or None (all exact). Token ``t`` reads ``j`` coded iff
    ``sink_tokens <= j < starts[t]``; ``window`` (sliding-window layers, else None): token ``t``
    attends to ``t - window < j <= t`` only, and from ``t >= window`` on reads ``j`` coded iff
    ``j < starts[t]`` (no exact sinks, see the module docstring). Returns ``out [T, H, D]``;
    with ``exact_rows > 0`` also the fully exact output of the last ``exact_rows`` queries, ``[exact_rows, H, D]``.
    """
    length, heads, dim = q.shape
    kv_heads = key.shape[1]
    scale = dim ** -0.5
    qg = _group_queries(q, kv_heads)
    key_t, val = key.permute(1, 2, 0), value.permute(1, 0, 2)  # [H_kv, D, T], [H_kv, T, D]
    coded = starts is not None and bool((starts > sink_tokens).any())
    if coded:
        ckey_t, cval = coded_key.permute(1, 2, 0), coded_value.permute(1, 0, 2)
        val_fix = val - cval  # exact = coded + fix
    outs = []
    for first in range(0, length, QUERY_CHUNK):
        rows = slice(first, min(first + QUERY_CHUNK, length))
        qc = qg[:, :, rows] * scale  # scaled once: scores = (q / sqrt(D)) . k
        if not coded:
            outs.append(_exact_chunk(qc, key_t, val, rows, 1.0, window))
            continue
        # columns [0, sink) exact; [sink, lo) coded for every row; [lo, r1) mixed (the band,
        # where the sink rule is applied again)
        lo = int(starts[rows].min())
        sink = min(sink_tokens, lo)
        # [t, 1]: the rows that read the sinks exactly (with a window: those whose window starts at 0)
        sink_rows = torch.ones(rows.stop - rows.start, 1, dtype=torch.bool) if window is None \
            else (torch.arange(rows.start, rows.stop) < window)[:, None]
        scores = torch.matmul(qc, ckey_t[:, None, :, : rows.stop])
        if sink:
            scores[..., :sink] = torch.where(sink_rows, torch.matmul(qc, key_t[:, None, :, :sink]),
                                             scores[..., :sink])
        band = scores[..., lo:]
        cols = torch.arange(lo, rows.stop)
        band_coded = (cols[None, :] < starts[rows][:, None]) & ((cols[None, :] >= sink_tokens) | ~sink_rows)  # [t, n]
        band.copy_(torch.where(band_coded, band, torch.matmul(qc, key_t[:, None, :, lo : rows.stop])))
        _mask_unseen_(band, rows, lo, window)
        if window is not None:  # the columns before the band can be before a row's window too
            _mask_unseen_(scores[..., :lo], rows, 0, window)
        probs = scores.softmax(-1)
        out = torch.matmul(probs, cval[:, None, : rows.stop])
        out += torch.matmul(probs[..., lo:] * ~band_coded, val_fix[:, None, lo : rows.stop])
        if sink:
            out += torch.matmul(probs[..., :sink] * sink_rows, val_fix[:, None, :sink])
        outs.append(out)
    out = torch.cat(outs, dim=2).permute(2, 0, 1, 3).reshape(length, heads, dim)
    if exact_rows <= 0:
        return out
    rows = slice(length - exact_rows, length)
    exact = _exact_chunk(qg[:, :, rows], key_t, val, rows, scale, window)
    return out, exact.permute(2, 0, 1, 3).reshape(exact_rows, heads, dim)
