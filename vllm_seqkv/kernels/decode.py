"""Fused paged decode attention over transform-format pages (Triton): one query per sequence.

Serves every transform preset: ``seqkv-3-nox`` and the cross-layer layers of
``seqkv-2/2.5/3/4`` (given ``previous``, the layer below's coding-frame reconstruction).
Dense K/V are never written to memory; per tile of ``TILE`` context slots (gathered through the
block table, so a tile may span pages of any block size):

- keys are rebuilt in registers as :mod:`.reconstruct` does (unpack codes ->
  Lloyd-Max levels ``z_k`` -> ``z_k @ inverse + mean`` (+ the cross-layer prediction
  ``[K̂_{l-1}, V̂_{l-1}] @ W + b`` of the slot's ``previous`` row) -> RoPE at the slot's
  position), then scored against all query heads of the GQA group with ``tl.dot`` (the group
  is padded to 16 rows, the smallest ``tl.dot`` tile) and folded into an online softmax;
- values are never rebuilt: ``v = z_v @ inverse_v + mean_v (+ pred_v)`` is linear in its
  levels, so the program accumulates ``sum_j p_j z_v,j`` (and, cross-layer, ``sum_j p_j
  pred_v,j``) and the reduction applies the basis once per query head:

      sum_j p_j v_j = (sum_j p_j z_v,j) @ inverse_v + mean_v * sum_j p_j (+ sum_j p_j pred_v,j).

  That is the same sum as over rebuilt rows, reassociated: ``p @ z_v`` is a ``tl.dot`` at
  ``precision`` (float32 accumulation), the basis and mean are applied in float32; tests hold
  the result to the reference's float32 tolerance at ``precision="ieee"``.

Two launches: ``transform_decode_partial_kernel`` (grid ``[B, H_kv, splits]``: one GQA group
over one contiguous chunk of tiles; writes the unnormalised level sum, max and sum of each
split) and ``transform_decode_reduce_kernel`` (grid ``[B, Hq]``: merges the splits, applies
``inverse_v`` and ``mean_v``, adds the exact own token at ``seq_lens - 1`` read from
``own_k``/``own_v``, normalises). The cache is read for positions ``[0, seq_lens - 1)``.

Costs per token-head: ``D^2`` multiply-adds to rebuild the key (``precision`` picks the
``tl.dot`` operand type, see :data:`~.reconstruct.PRECISIONS`), ``2 D`` per query head
for the score and the level sum; cross-layer layers add ``2 H D^2`` per stream for the
prediction, as in reconstruction. The key's inverse basis ``[D, D]`` is loaded again for
every tile (not hoisted out of the loop). No GPU time has been measured for this kernel; tile
size, warps and the split heuristic (:func:`~.shared.choose_splits` counted in
tiles, so at least 4 tiles per split) are untuned.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_seqkv.kernels.checks import check_decode_inputs, check_pages, expect
from vllm_seqkv.kernels.shared import choose_splits
from vllm_seqkv.kernels.params import TransformLayerParams
from vllm_seqkv.kernels.reconstruct import (
    PRECISIONS,
    check_previous,
    decode_transform_stream,
    mma,
    predict_columns,
    rope_halves,
    unpack_levels,
)
from vllm_seqkv.kernels.triton_common import NEG_BIG, split_weights

TILE = 32  # context slots per step of the partial kernel
MIN_GROUP_ROWS = 16  # tl.dot needs every tile dimension >= 16


@triton.jit
def load_query_halves(q_ptr, b, kvh, stride_qb, stride_qh, GROUP: tl.constexpr,
                      GROUP_PAD: tl.constexpr, D: tl.constexpr):
    """The GQA group's queries as float32 halves ``[GROUP_PAD, D/2]`` (padding rows zero)."""
    g = tl.arange(0, GROUP_PAD)
    j = tl.arange(0, D // 2)
    ptrs = q_ptr + b * stride_qb + (kvh * GROUP + g)[:, None] * stride_qh + j[None, :]
    mask = (g < GROUP)[:, None]
    lo = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    hi = tl.load(ptrs + D // 2, mask=mask, other=0.0).to(tl.float32)
    return lo, hi


@triton.jit
def tile_slots(pages_ptr, block_table_ptr, b, kvh, positions, valid, stride_pb, stride_ph, stride_pt,
               stride_bt, BLOCK_SIZE: tl.constexpr):
    """Slot addresses ``[TILE]`` of sequence ``b``'s positions (head ``kvh``) via the block table."""
    block = tl.load(block_table_ptr + b * stride_bt + positions // BLOCK_SIZE, mask=valid, other=0)
    return (pages_ptr + block.to(tl.int64) * stride_pb + kvh * stride_ph
            + (positions % BLOCK_SIZE) * stride_pt)


@triton.jit
def transform_decode_partial_kernel(
        q_ptr, pages_ptr, block_table_ptr, seq_lens_ptr, rope_ptr, prev_k_ptr, prev_v_ptr,
        acc_ptr, pred_acc_ptr, max_ptr, sum_ptr,
        k_start, k_nbits, k_lstart, k_levels, k_inverse, k_mean, k_w, k_b,
        v_start, v_nbits, v_lstart, v_levels, v_w, v_b,
        stride_qb, stride_qh, stride_pb, stride_ph, stride_pt, stride_bt,
        num_heads, num_q_heads, num_splits, tiles_per_split, prev_rows_per_seq, scale, skip_first,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        TILE: tl.constexpr, D: tl.constexpr, K_OFF: tl.constexpr, V_OFF: tl.constexpr,
        K_PRED: tl.constexpr, V_PRED: tl.constexpr, ROPE: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax of one GQA group over tiles ``[split * tiles_per_split, ...)`` of its
    context, positions ``>= skip_first``. Writes acc ``[B, Hq, splits, D]`` (level sum
    ``sum_j p_j z_v,j``), pred_acc (same,
    ``sum_j p_j pred_v,j``; cross-layer values only), max and sum ``[B, Hq, splits]``."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    cached_len = tl.load(seq_lens_ptr + b) - 1  # the last position is the exact own token
    q_lo, q_hi = load_query_halves(q_ptr, b, kvh, stride_qb, stride_qh, GROUP, GROUP_PAD, D)
    run_max = tl.full([GROUP_PAD], NEG_BIG, tl.float32)
    run_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    pred_acc = tl.zeros([GROUP_PAD, D], tl.float32)
    first_tile = split * tiles_per_split
    num_tiles = tl.minimum(tl.cdiv(cached_len, TILE) - first_tile, tiles_per_split)
    for i in range(0, num_tiles):
        positions = ((first_tile + i) * TILE + tl.arange(0, TILE)).to(tl.int64)
        valid = (positions < cached_len) & (positions >= skip_first)
        slots = tile_slots(pages_ptr, block_table_ptr, b, kvh, positions, valid,
                           stride_pb, stride_ph, stride_pt, stride_bt, BLOCK_SIZE)
        rows = b.to(tl.int64) * prev_rows_per_seq + positions
        k_lo, k_hi = decode_transform_stream(slots, valid, rows, kvh, num_heads, k_start, k_nbits,
                                             k_lstart, k_levels, k_inverse, k_mean, k_w, k_b, prev_k_ptr,
                                             prev_v_ptr, K_OFF, D, K_PRED, PRECISION)
        if ROPE:
            k_lo, k_hi = rope_halves(k_lo, k_hi, rope_ptr, positions, valid, D)
        scores = (mma(q_lo, tl.trans(k_lo), PRECISION) + mma(q_hi, tl.trans(k_hi), PRECISION)) * scale
        scores = tl.where(valid[None, :], scores, float("-inf"))  # [GROUP_PAD, TILE]
        new_max = tl.maximum(run_max, tl.max(scores, axis=1))
        alpha = tl.exp(run_max - new_max)
        probs = tl.exp(scores - new_max[:, None])
        run_sum = run_sum * alpha + tl.sum(probs, axis=1)
        z_v = unpack_levels(slots, valid, kvh, v_start, v_nbits, v_lstart, v_levels, V_OFF, D)
        acc = acc * alpha[:, None] + mma(probs, z_v, PRECISION)
        if V_PRED:
            pred_v = predict_columns(prev_k_ptr, prev_v_ptr, rows, valid, v_w, v_b, kvh, num_heads,
                                     0, D, D, PRECISION)
            pred_acc = pred_acc * alpha[:, None] + mma(probs, pred_v, PRECISION)
        run_max = new_max
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D)
    in_group = g < GROUP
    state = (b * num_q_heads + kvh * GROUP + g) * num_splits + split
    tl.store(acc_ptr + state[:, None] * D + d[None, :], acc, mask=in_group[:, None])
    if V_PRED:
        tl.store(pred_acc_ptr + state[:, None] * D + d[None, :], pred_acc, mask=in_group[:, None])
    tl.store(max_ptr + state, run_max, mask=in_group)
    tl.store(sum_ptr + state, run_sum, mask=in_group)


@triton.jit
def transform_decode_reduce_kernel(
        q_ptr, own_k_ptr, own_v_ptr, out_ptr, lse_ptr, acc_ptr, pred_acc_ptr, max_ptr, sum_ptr,
        v_inverse, v_mean, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
        stride_ob, stride_oh, num_q_heads, num_splits, scale,
        GROUP: tl.constexpr, SPLITS_PAD: tl.constexpr, D: tl.constexpr, V_PRED: tl.constexpr,
        LSE: tl.constexpr):
    """Merge the splits of one (sequence, query head): values from their level sum, plus the own
    token; with ``LSE`` also the log of the softmax denominator ``[B, Hq]``."""
    b = tl.program_id(0)
    hq = tl.program_id(1)
    kvh = hq // GROUP
    d = tl.arange(0, D)
    state, in_range, split_weight, cached_mass, own_weight, top = split_weights(
        q_ptr, own_k_ptr, max_ptr, sum_ptr, b, hq, kvh, stride_qb, stride_qh, stride_kb, stride_kh,
        num_q_heads, num_splits, scale, SPLITS_PAD, D)
    if LSE:
        tl.store(lse_ptr + b * num_q_heads + hq, top + tl.log(cached_mass + own_weight))
    own_v = tl.load(own_v_ptr + b * stride_vb + kvh * stride_vh + d).to(tl.float32)
    level_sum = tl.sum(split_weight[:, None] * tl.load(acc_ptr + state[:, None] * D + d[None, :],
                                                       mask=in_range[:, None], other=0.0), axis=0)
    inverse = tl.load(v_inverse + kvh * D * D + d[:, None] * D + d[None, :])
    cached = tl.sum(level_sum[:, None] * inverse, axis=0) + tl.load(v_mean + kvh * D + d) * cached_mass
    if V_PRED:
        cached += tl.sum(split_weight[:, None] * tl.load(pred_acc_ptr + state[:, None] * D + d[None, :],
                                                         mask=in_range[:, None], other=0.0), axis=0)
    out = (cached + own_weight * own_v) / (cached_mass + own_weight)
    tl.store(out_ptr + b * stride_ob + hq * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def check_fused_args(query, own_k, own_v, pages, block_table, seq_lens, params: TransformLayerParams,
                     rope, previous, skip_first: int, precision: str = "ieee"):
    """Argument checks of the fused transform decode (Triton and CUDA op); returns ``previous``
    made contiguous (None for layers that are not cross-layer predicted)."""
    check_pages(pages, params)
    device, heads, dim = pages.device, params.num_kv_heads, params.head_dim
    expect(pages.stride(3) == 1, f"pages: last dimension must be contiguous, strides {pages.stride()}")
    check_decode_inputs(query, own_k, own_v, block_table, seq_lens, rope, skip_first, heads, dim, device)
    expect(own_k is not None, "own_k/own_v: the Triton decode needs the own token's K/V")
    batch = query.shape[0]
    expect(precision in PRECISIONS, f"precision: expected one of {list(PRECISIONS)}, got {precision!r}")
    return check_previous(previous, (batch, block_table.shape[1] * pages.shape[2], heads, dim), params,
                          device)


def fused_transform_decode_attention(query: torch.Tensor, own_k: torch.Tensor, own_v: torch.Tensor,
                                     pages: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                                     params: TransformLayerParams, scale: float,
                                     rope: torch.Tensor | None = None, previous=None,
                                     precision: str = "ieee", num_splits: int | None = None,
                                     skip_first: int = 0, return_lse: bool = False):
    """query ``[B, Hq, D]`` (post-RoPE), own_k/own_v ``[B, H, D]`` (exact K/V of position
    ``seq_lens - 1``, post-RoPE), pages uint8 ``[N, H, bs, S]`` (any block size), block_table
    int ``[B, max_blocks]``, seq_lens int ``[B]`` (>= 1, own token included) -> ``[B, Hq, D]``
    in the query's dtype.

    ``rope``: a :func:`~vllm_seqkv.kernels.params.rope_cache` table ``[P, D]``
    (``P >= max(seq_lens) - 1``) to rotate the pre-RoPE cached keys at their positions; None
    when the layout's keys are not pre-RoPE. ``previous``: ``(K, V)`` ``[B, max_blocks * bs, H, D]``
    (copied when not contiguous), the layer below's coding-frame reconstruction, required
    exactly when the layer is cross-layer predicted. ``precision``: ``tl.dot`` operands
    (:data:`~.reconstruct.PRECISIONS`; the reduction is float32 whatever it is).
    ``num_splits``: split-K factor (default: :func:`~.shared.choose_splits` over tiles).
    ``skip_first``: cached positions ``< skip_first`` are not read (the caller attends to them,
    e.g. exact sink tokens, and merges by the log-sum-exp). ``return_lse``: also return the
    log of each softmax denominator, float32 ``[B, Hq]`` (scores scaled by ``scale``).
    """
    previous = check_fused_args(query, own_k, own_v, pages, block_table, seq_lens, params, rope, previous,
                                skip_first, precision)
    batch, q_heads, dim = query.shape
    heads, block_size = params.num_kv_heads, pages.shape[2]
    prev_rows_per_seq = block_table.shape[1] * block_size
    out = torch.empty_like(query)
    lse = torch.empty(batch, q_heads, device=query.device, dtype=torch.float32)
    if batch == 0:
        return (out, lse) if return_lse else out
    group = q_heads // heads
    max_tiles = triton.cdiv(prev_rows_per_seq, TILE)
    splits = num_splits or choose_splits(batch, heads, max_tiles)
    f32 = dict(device=query.device, dtype=torch.float32)
    acc = torch.empty(batch, q_heads, splits, dim, **f32)
    pred_acc = torch.empty_like(acc) if params.value.has_pred else acc
    split_max, split_sum = torch.empty(batch, q_heads, splits, **f32), torch.empty(batch, q_heads, splits, **f32)
    k, v = params.key, params.value
    prev_k, prev_v = previous if previous is not None else (k.mean, k.mean)
    transform_decode_partial_kernel[(batch, heads, splits)](
        query, pages, block_table, seq_lens, rope if rope is not None else k.mean, prev_k, prev_v,
        acc, pred_acc, split_max, split_sum,
        k.start, k.nbits, k.level_start, k.levels, k.inverse, k.mean, k.pred_w, k.pred_b,
        v.start, v.nbits, v.level_start, v.levels, v.pred_w, v.pred_b,
        query.stride(0), query.stride(1), pages.stride(0), pages.stride(1), pages.stride(2),
        block_table.stride(0), heads, q_heads, splits, triton.cdiv(max_tiles, splits),
        prev_rows_per_seq, float(scale), int(skip_first),
        GROUP=group, GROUP_PAD=max(MIN_GROUP_ROWS, triton.next_power_of_2(group)), BLOCK_SIZE=block_size,
        TILE=TILE, D=dim, K_OFF=k.offset, V_OFF=v.offset, K_PRED=k.has_pred, V_PRED=v.has_pred,
        ROPE=rope is not None, PRECISION=PRECISIONS[precision])
    transform_decode_reduce_kernel[(batch, q_heads)](
        query, own_k, own_v, out, lse, acc, pred_acc, split_max, split_sum, v.inverse, v.mean,
        query.stride(0), query.stride(1), own_k.stride(0), own_k.stride(1),
        own_v.stride(0), own_v.stride(1), out.stride(0), out.stride(1),
        q_heads, splits, float(scale),
        GROUP=group, SPLITS_PAD=triton.next_power_of_2(splits), D=dim, V_PRED=v.has_pred,
        LSE=return_lse)
    return (out, lse) if return_lse else out
