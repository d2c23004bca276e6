"""``@triton.jit`` helpers shared by the kernels: reading the rotation slot format (see
:mod:`vllm_seqkv.kernels.rotation.params`) and merging split-K decode partials."""

from __future__ import annotations

import triton
import triton.language as tl

NEG_BIG = -1.0e30  # finite "minus infinity" for running maxima (keeps exp(m - m) well defined)


@triton.jit
def load_norm(slot_ptrs, offset: tl.constexpr, mask):
    """fp16 norm stored little-endian at ``slot + offset`` -> float32 (0 where masked)."""
    lo = tl.load(slot_ptrs + offset, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(slot_ptrs + offset + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def load_centroids(slot_ptrs, mask, codebook_ptr, D: tl.constexpr, BITS_A: tl.constexpr,
                   BITS_B: tl.constexpr, OFF_A: tl.constexpr, OFF_B: tl.constexpr):
    """Centroids ``[N, D]`` of the slots at ``slot_ptrs [N]`` (rotated domain, unit scale).

    Coordinate ``d < D/2`` is the ``d``-th ``BITS_A``-bit code of the stream at ``OFF_A``,
    the others come from ``OFF_B``; ``codebook`` is the a-book followed by the b-book.
    """
    d = tl.arange(0, D)
    first = d < D // 2
    bits = tl.where(first, BITS_A, BITS_B)
    bitpos = tl.where(first, d * BITS_A, (d - D // 2) * BITS_B)
    byte = tl.where(first, OFF_A, OFF_B) + bitpos // 8
    shift = bitpos % 8
    book = tl.where(first, 0, 1 << BITS_A)
    ptrs = slot_ptrs[:, None] + byte[None, :]
    spans = ((shift + bits) > 8)[None, :]
    b0 = tl.load(ptrs, mask=mask[:, None], other=0).to(tl.int32)
    b1 = tl.load(ptrs + 1, mask=mask[:, None] & spans, other=0).to(tl.int32)
    code = ((b0 | (b1 << 8)) >> shift[None, :]) & ((1 << bits[None, :]) - 1)
    return tl.load(codebook_ptr + book[None, :] + code)


@triton.jit
def split_weights(q_ptr, own_k_ptr, max_ptr, sum_ptr, b, hq, kvh, stride_qb, stride_qh,
                  stride_kb, stride_kh, num_q_heads, num_splits, scale,
                  SPLITS_PAD: tl.constexpr, D: tl.constexpr):
    """Softmax weights of one (sequence, query head)'s split-K partials and of its exact own
    token, against their common maximum: ``(state [SPLITS_PAD]`` (index of each split's
    partial), ``in_range``, ``split_weight``, ``cached_mass`` (the partials' total weight),
    ``own_weight``, ``top`` (the common maximum score)``)``."""
    d = tl.arange(0, D)
    s = tl.arange(0, SPLITS_PAD)
    in_range = s < num_splits
    state = (b * num_q_heads + hq) * num_splits + s
    split_max = tl.load(max_ptr + state, mask=in_range, other=NEG_BIG)
    split_sum = tl.load(sum_ptr + state, mask=in_range, other=0.0)
    q = tl.load(q_ptr + b * stride_qb + hq * stride_qh + d).to(tl.float32)
    own_k = tl.load(own_k_ptr + b * stride_kb + kvh * stride_kh + d).to(tl.float32)
    own_score = tl.sum(q * own_k) * scale
    top = tl.maximum(tl.max(split_max), own_score)
    split_weight = tl.exp(split_max - top)
    return (state, in_range, split_weight, tl.sum(split_weight * split_sum), tl.exp(own_score - top),
            top)
