"""Random but valid transform-format layers for the C++ CPU ops' tests and benchmark
(benchmarks/cpu_decode.py): seqkv-3-nox-like slots (no cross-layer prediction) with chosen
bits per element for K and V, optionally a RoPE-pair block-diagonal key basis."""

from __future__ import annotations

import torch

from vllm_seqkv.codec.base import SlotLayout
from vllm_seqkv.codec.transform import MAX_BITS, Transform, TransformCodec


def random_bits(heads: int, dim: int, bits_per_element: float, gen: torch.Generator) -> torch.Tensor:
    """Widths ``[H, D]`` in 0..8 with the same whole number of bytes per head, uneven (some 0-bit
    and some wide components), in random component order."""
    total = round(bits_per_element * dim / 8) * 8
    rows = []
    for _ in range(heads):
        bits = torch.full((dim,), total // dim, dtype=torch.long)
        bits[torch.randperm(dim, generator=gen)[: total % dim]] += 1
        for _ in range(dim):  # move bits around, keeping the total
            i, j = torch.randint(0, dim, (2,), generator=gen).tolist()
            if bits[i] < MAX_BITS and bits[j] > 0 and i != j:
                bits[i] += 1
                bits[j] -= 1
        rows.append(bits)
    return torch.stack(rows)


def random_basis(heads: int, dim: int, pairs: bool, gen: torch.Generator) -> torch.Tensor:
    """Well-conditioned ``[H, D, D]``; with ``pairs`` nonzero only inside RoPE pairs {j, j + D/2}."""
    if not pairs:
        q, _ = torch.linalg.qr(torch.randn(heads, dim, dim, generator=gen, dtype=torch.float64))
        scale = torch.rand(heads, 1, dim, generator=gen, dtype=torch.float64) + 0.5
        return (q * scale).float()
    half = dim // 2
    basis = torch.zeros(heads, dim, dim, dtype=torch.float64)
    lo, hi = torch.arange(half), torch.arange(half, dim)
    blocks = torch.randn(heads, half, 2, 2, generator=gen, dtype=torch.float64) * 0.3
    blocks += torch.eye(2, dtype=torch.float64)
    basis[:, lo, lo] = blocks[..., 0, 0]
    basis[:, lo, hi] = blocks[..., 0, 1]
    basis[:, hi, lo] = blocks[..., 1, 0]
    basis[:, hi, hi] = blocks[..., 1, 1]
    return basis.float()


def random_levels(bits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Sorted random quantizer levels ``[H, D, 2**MAX_BITS]`` for component widths ``bits [H, D]``."""
    heads, dim = bits.shape
    levels = torch.zeros(heads, dim, 1 << MAX_BITS)
    for h in range(heads):
        for c in range(dim):
            n = 1 << int(bits[h, c])
            spread = float(torch.rand(1, generator=gen)) * 2 + 0.2
            levels[h, c, :n] = (torch.randn(n, generator=gen) * spread).sort().values
    return levels


def random_transform(heads: int, dim: int, bits_per_element: float, pairs: bool, seed: int) -> Transform:
    gen = torch.Generator().manual_seed(seed)
    bits = random_bits(heads, dim, bits_per_element, gen)
    levels = random_levels(bits, gen)
    mean = torch.randn(heads, dim, generator=gen) * 0.5
    return Transform.from_padded(mean, random_basis(heads, dim, pairs, gen), bits, levels)


def random_layout(heads: int, dim: int, key_bits: float = 2.5, value_bits: float = 3.5, pair_keys: bool = False,
                  seed: int = 0) -> SlotLayout:
    """A seqkv-3-nox-like SlotLayout: TransformCodec K and V, no cross-layer prediction."""
    key = TransformCodec(random_transform(heads, dim, key_bits, pair_keys, seed))
    value = TransformCodec(random_transform(heads, dim, value_bits, False, seed + 1))
    return SlotLayout(key, value, heads, dim)


def random_paged_case(layout: SlotLayout, seq_lens: list[int], block_size: int, seed: int = 0,
                      extra_blocks: int = 2):
    """Random page bytes (every slot decodes to finite levels), shuffled block table int32
    ``[B, max_blocks]`` (unused entries point at a real block too), seq_lens int32 ``[B]``."""
    gen = torch.Generator().manual_seed(seed)
    counts = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(counts) + extra_blocks
    pages = torch.randint(0, 256, (num_blocks, layout.num_kv_heads, block_size, layout.slot_bytes),
                          generator=gen, dtype=torch.uint8)
    order = torch.randperm(num_blocks, generator=gen)
    table = order[torch.randint(0, num_blocks, (len(seq_lens), max(counts)), generator=gen)].to(torch.int32)
    used = 0
    for i, count in enumerate(counts):
        table[i, :count] = order[used:used + count]
        used += count
    return pages, table, torch.tensor(seq_lens, dtype=torch.int32)
