"""Synthetic calibrations for codec tests (no model): every preset kind, any head size."""

from __future__ import annotations

from functools import lru_cache

import torch

from vllm_seqkv.codec.calibration import Capture


def synthetic_capture(layers: int = 2, heads: int = 3, dim: int = 64, tokens: int = 512,
                      seed: int = 0, vocab: int | None = None) -> Capture:
    """K/V with per-channel offsets, uneven channel scales and layer-to-layer correlation;
    with ``vocab``, layer 0 is a function of random token ids (and the capture has its table)."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(heads, dim, generator=gen) * 3 + 0.1
    keys, values = [], []
    base_k = torch.randn(tokens, heads, dim, generator=gen)
    base_v = torch.randn(tokens, heads, dim, generator=gen)
    for layer in range(layers):
        keys.append((base_k + 0.3 * torch.randn(tokens, heads, dim, generator=gen)) * scale + layer)
        values.append(base_v + 0.3 * torch.randn(tokens, heads, dim, generator=gen))
    a = torch.randn(layers, heads, dim, dim, generator=gen) / dim**0.5
    value_metric = a @ a.transpose(-1, -2) + 0.1 * torch.eye(dim)
    query_sq = torch.rand(layers, heads, dim, generator=gen) + 0.1
    if vocab is None:
        return Capture("synthetic", keys, values, query_sq, value_metric)
    ids = torch.randint(0, vocab, (tokens,), generator=gen)
    table = (torch.randn(vocab, heads, dim, generator=gen) * scale,
             torch.randn(vocab, heads, dim, generator=gen))
    keys[0], values[0] = table[0][ids], table[1][ids]
    return Capture("synthetic", keys, values, query_sq, value_metric, ids, table, "synthetic table")


@lru_cache(maxsize=None)
def synthetic_calibration(preset: str, layers: int = 2, heads: int = 3, dim: int = 64):
    from vllm_seqkv.codec.presets import PRESETS

    return PRESETS[preset].fit(synthetic_capture(layers, heads, dim))


def encode(stream, x, previous=None):
    """Encode with a stand-in ``previous`` for cross-layer codecs."""
    return stream.encode(x, previous if previous is not None else (x, x)) if stream.takes_previous \
        else stream.encode(x)
