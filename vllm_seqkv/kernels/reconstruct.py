"""Reconstruction of the transform format (``seqkv-2/2.5/3/4``, ``seqkv-3-nox``) from pages.

One Triton kernel, grid ``[blocks, block_size / TILE, H]``: each program reads ``TILE`` slots
of one page and head, and for both streams

1. unpacks each component's code from the bitstream (``start``/``nbits`` tables,
   :mod:`.params`; a code spans at most 2 bytes),
2. looks up the component's Lloyd-Max level (packed ``levels``, from ``level_start [H, D]``),
3. multiplies by the inverse basis with ``tl.dot`` (``[TILE, D] x [D, D/2]`` twice: the two
   halves are kept apart so RoPE can pair channel ``i`` with ``i + D/2`` in registers),
4. adds the mean and, for cross-layer layers, the prediction
   ``[K̂_{l-1}, V̂_{l-1}] @ W + b`` from the previous layer's reconstruction (an input tensor),
5. optionally applies RoPE to keys at each slot's position (``cos/sin`` cache rows), and
   stores float32 / bf16 / fp16 ``[tokens, H, D]``.

Decode cost, honestly (no GPU figure has been measured for this kernel yet):

- The old kernel (:mod:`.decode_attention`, format ``seqkv-3-rot``) never rebuilds keys: with
  ``k = n S H c / w + mu`` it takes ``q . k = n (q' . c) + q . mu`` with ``q'`` rotated once
  per query head, because the cached key frame is the query's frame. (That holds for
  post-RoPE keys, ``seqkv-3-rot-none``, which the benchmark uses; the kernel applies no RoPE.)
  Here keys are coded **pre-RoPE** and the basis is a **dense, per-head, calibrated** matrix.
  RoPE depends on the position, so ``q . RoPE_p(x)`` = ``RoPE_{-p}(q) . x``: moving the work
  to the query side needs one ``D x D`` product per position (per query head, worse with
  GQA), no saving. Each key is therefore rebuilt in the model frame and rotated per position.
  Reconstruction costs ``D * D`` multiply-adds per token-head per stream (K and V: ``2 D^2``;
  32k MAC for D = 128), which has to run on tensor cores (``tl.dot``; ``precision="tf32"``,
  ``"bf16"`` or ``"fp16"``: the fp32 ``"ieee"`` default is for exact tests and runs on CUDA cores), against
  ``sum(bits) / 8`` bytes read per stream: decode is compute-bound, not bandwidth-bound.
- Cross-layer presets (``seqkv-2/2.5/3/4``) add the prediction: ``W`` is dense ``[2HD, HD]``,
  i.e. ``2 H D^2`` MACs per token-head per stream (H = 8, D = 128: 262k MACs, 16x the
  reconstruction itself), and it needs the previous layer's reconstruction of the same
  positions. A decode of layer ``l`` from pages alone therefore reads and reconstructs layers
  ``0..l`` (O(l) work per layer, O(L^2) per forward pass) unless each layer's reconstruction is
  handed up to the next, as the CPU backend's ``LayerChain`` does (then one extra
  ``[tokens, H, D]`` K and V live per layer boundary: the size of a dense cache of one layer).
- ``seqkv-3-nox`` (no cross-layer prediction) has no dependency between layers: each layer
  decodes from its own pages only.
- This kernel writes the reconstruction to memory for a dense attention (torch SDPA) to read:
  that is strictly more traffic than a bf16 cache (the dense K/V are written and read again),
  so "reconstruct + SDPA" (:func:`transform_decode_attention`) cannot beat bf16 SDPA at
  decode; it is the prefill path, a correctness baseline and the benchmark's comparison row.
- The fused decode (:mod:`.decode`, what ``paged_decode_attention`` runs on Triton)
  rebuilds keys in registers as above (same helpers) and never rebuilds values: it sums
  ``p_j z_v,j`` over the levels and applies ``inverse_v`` and ``mean_v`` once per query head,
  so per token-head it costs ``D^2`` MACs (keys) instead of ``2 D^2`` and writes no dense K/V.
  The key rebuild is the arithmetic counted above; cross-layer layers still pay the
  prediction (both streams, per slot) and still need ``previous``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_seqkv.kernels.checks import FLOAT_DTYPES, INDEX_DTYPES, check_pages, check_tensor, expect
from vllm_seqkv.kernels.params import TransformLayerParams

# fp32 (exact tests), tf32, bf16 / fp16 operands (tensor cores; fp32 accumulation). Triton's
# CPU interpreter multiplies bf16 operands as raw uint16 bits, so "bf16" is only checked on a
# GPU; "fp16" (3 more mantissa bits, range ample for K/V and the fitted bases) is checked on CPU.
PRECISIONS = {"ieee": 0, "tf32": 1, "bf16": 2, "fp16": 3}


@triton.jit
def mma(a, b, PRECISION: tl.constexpr):
    """``a @ b`` with float32 accumulation; PRECISION: 0 fp32 (ieee), 1 tf32, 2 bf16, 3 fp16 inputs."""
    if PRECISION == 3:
        return tl.dot(a.to(tl.float16), b.to(tl.float16), out_dtype=tl.float32)
    elif PRECISION == 2:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
    elif PRECISION == 1:
        return tl.dot(a, b, input_precision="tf32")
    else:
        return tl.dot(a, b, input_precision="ieee")


@triton.jit
def unpack_levels(slot_ptrs, row_mask, h, start_ptr, nbits_ptr, lstart_ptr, levels_ptr,
                  OFF: tl.constexpr, D: tl.constexpr):
    """Level ``z [TILE, D]`` of every component of the stream at byte ``OFF`` of each slot."""
    c = tl.arange(0, D)
    start = tl.load(start_ptr + h * D + c)
    nbits = tl.load(nbits_ptr + h * D + c)
    shift = start & 7
    spans = (shift + nbits) > 8
    ptrs = slot_ptrs[:, None] + (OFF + (start >> 3))[None, :]
    b0 = tl.load(ptrs, mask=row_mask[:, None], other=0).to(tl.int32)
    b1 = tl.load(ptrs + 1, mask=row_mask[:, None] & spans[None, :], other=0).to(tl.int32)
    code = ((b0 | (b1 << 8)) >> shift[None, :]) & ((1 << nbits[None, :]) - 1)
    return tl.load(levels_ptr + tl.load(lstart_ptr + h * D + c)[None, :] + code)


@triton.jit
def inverse_half(z, inverse_ptr, mean_ptr, h, COL0: tl.constexpr, D: tl.constexpr,
                 PRECISION: tl.constexpr):
    """``(z @ inverse[h])[:, COL0:COL0 + D/2] + mean[h, COL0:COL0 + D/2]``."""
    c = tl.arange(0, D)
    j = COL0 + tl.arange(0, D // 2)
    inv = tl.load(inverse_ptr + h * D * D + c[:, None] * D + j[None, :])
    return mma(z, inv, PRECISION) + tl.load(mean_ptr + h * D + j)[None, :]


@triton.jit
def predict_columns(prev_k_ptr, prev_v_ptr, rows, row_mask, w_ptr, b_ptr, h, num_heads,
                    COL0: tl.constexpr, NCOLS: tl.constexpr, D: tl.constexpr,
                    PRECISION: tl.constexpr):
    """Columns ``COL0:COL0 + NCOLS`` of head ``h`` of the cross-layer prediction
    ``[prev_k, prev_v] @ W + b`` (``[TILE, NCOLS]``; the write kernel and the decoder share it)."""
    c = tl.arange(0, D)
    j = COL0 + tl.arange(0, NCOLS)
    hd = num_heads * D
    acc = tl.zeros([rows.shape[0], NCOLS], tl.float32)
    for g in range(0, num_heads):
        src = rows[:, None] * hd + g * D + c[None, :]
        pk = tl.load(prev_k_ptr + src, mask=row_mask[:, None], other=0.0).to(tl.float32)
        pv = tl.load(prev_v_ptr + src, mask=row_mask[:, None], other=0.0).to(tl.float32)
        wk = tl.load(w_ptr + (g * D + c)[:, None].to(tl.int64) * hd + h * D + j[None, :])
        wv = tl.load(w_ptr + (hd + g * D + c)[:, None].to(tl.int64) * hd + h * D + j[None, :])
        acc += mma(pk, wk, PRECISION) + mma(pv, wv, PRECISION)
    return acc + tl.load(b_ptr + h * D + j)[None, :]


@triton.jit
def decode_transform_stream(slot_ptrs, row_mask, rows, h, num_heads, start_ptr, nbits_ptr,
                            lstart_ptr, levels_ptr, inverse_ptr, mean_ptr, w_ptr, b_ptr, prev_k_ptr, prev_v_ptr,
                            OFF: tl.constexpr, D: tl.constexpr, HAS_PRED: tl.constexpr,
                            PRECISION: tl.constexpr):
    """Reconstructed stream in the coding frame as two halves ``[TILE, D/2]`` (lo, hi)."""
    z = unpack_levels(slot_ptrs, row_mask, h, start_ptr, nbits_ptr, lstart_ptr, levels_ptr, OFF, D)
    lo = inverse_half(z, inverse_ptr, mean_ptr, h, 0, D, PRECISION)
    hi = inverse_half(z, inverse_ptr, mean_ptr, h, D // 2, D, PRECISION)
    if HAS_PRED:
        lo += predict_columns(prev_k_ptr, prev_v_ptr, rows, row_mask, w_ptr, b_ptr, h, num_heads,
                              0, D // 2, D, PRECISION)
        hi += predict_columns(prev_k_ptr, prev_v_ptr, rows, row_mask, w_ptr, b_ptr, h, num_heads,
                              D // 2, D // 2, D, PRECISION)
    return lo, hi


@triton.jit
def rope_halves(lo, hi, rope_ptr, positions, row_mask, D: tl.constexpr):
    """RoPE of keys given as halves ``[TILE, D/2]`` at ``positions [TILE]`` (int64) from a
    :func:`~vllm_seqkv.kernels.params.rope_cache` table (masked rows: unrotated)."""
    j = tl.arange(0, D // 2)
    rows = positions[:, None] * D + j[None, :]
    cos = tl.load(rope_ptr + rows, mask=row_mask[:, None], other=1.0)
    sin = tl.load(rope_ptr + rows + D // 2, mask=row_mask[:, None], other=0.0)
    return lo * cos - hi * sin, hi * cos + lo * sin


@triton.jit
def reconstruct_transform_kernel(
        pages_ptr, block_ids_ptr, block_pos_ptr, rope_ptr, key_ptr, value_ptr, key_code_ptr,
        prev_k_ptr, prev_v_ptr,
        k_start, k_nbits, k_lstart, k_levels, k_inverse, k_mean, k_w, k_b,
        v_start, v_nbits, v_lstart, v_levels, v_inverse, v_mean, v_w, v_b,
        num_heads, stride_pb, stride_ph, stride_pt,
        BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, D: tl.constexpr,
        K_OFF: tl.constexpr, V_OFF: tl.constexpr, K_PRED: tl.constexpr, V_PRED: tl.constexpr,
        ROPE: tl.constexpr, KEEP_CODE: tl.constexpr, PRECISION: tl.constexpr):
    """Page ``block_ids[m]`` (< 0: an unused table entry, written as zeros), slots
    ``[t*TILE, (t+1)*TILE)``, head ``h`` -> output rows ``m * BLOCK_SIZE + slot``."""
    m = tl.program_id(0)
    t = tl.program_id(1)
    h = tl.program_id(2)
    n = t * TILE + tl.arange(0, TILE)
    block = tl.load(block_ids_ptr + m).to(tl.int64)
    valid = block >= 0
    row_mask = (block + tl.zeros([TILE], tl.int64)) >= 0  # TILE divides BLOCK_SIZE
    slot_ptrs = (pages_ptr + tl.where(valid, block, 0) * stride_pb + h * stride_ph
                 + n.to(tl.int64) * stride_pt)
    rows = m.to(tl.int64) * BLOCK_SIZE + n
    k_lo, k_hi = decode_transform_stream(slot_ptrs, row_mask, rows, h, num_heads, k_start, k_nbits,
                                         k_lstart, k_levels, k_inverse, k_mean, k_w, k_b, prev_k_ptr,
                                         prev_v_ptr, K_OFF, D, K_PRED, PRECISION)
    v_lo, v_hi = decode_transform_stream(slot_ptrs, row_mask, rows, h, num_heads, v_start, v_nbits,
                                         v_lstart, v_levels, v_inverse, v_mean, v_w, v_b, prev_k_ptr,
                                         prev_v_ptr, V_OFF, D, V_PRED, PRECISION)
    keep = valid.to(tl.float32)  # unused table entries -> zeros
    j = tl.arange(0, D // 2)
    out = rows[:, None] * (num_heads * D) + h * D + j[None, :]
    if KEEP_CODE:
        tl.store(key_code_ptr + out, (k_lo * keep).to(key_code_ptr.dtype.element_ty))
        tl.store(key_code_ptr + out + D // 2, (k_hi * keep).to(key_code_ptr.dtype.element_ty))
    if ROPE:
        pos = tl.load(block_pos_ptr + m, mask=valid, other=0).to(tl.int64) + n
        k_lo, k_hi = rope_halves(k_lo, k_hi, rope_ptr, pos, row_mask, D)
    tl.store(key_ptr + out, (k_lo * keep).to(key_ptr.dtype.element_ty))
    tl.store(key_ptr + out + D // 2, (k_hi * keep).to(key_ptr.dtype.element_ty))
    tl.store(value_ptr + out, (v_lo * keep).to(value_ptr.dtype.element_ty))
    tl.store(value_ptr + out + D // 2, (v_hi * keep).to(value_ptr.dtype.element_ty))


def check_previous(previous, shape: tuple, params: TransformLayerParams, device):
    """``previous`` of a cross-layer layer: the layer below's coding-frame reconstruction, a
    ``(K, V)`` pair of ``shape`` (``[rows, H, D]``, or ``[B, rows, H, D]`` for decode), made
    contiguous (a copy when it is not); None for other layers."""
    if not params.cross_layer:
        return None
    expect(previous is not None,
           "this layer is predicted from the layer below (cross-layer preset): pass previous=(K, V), "
           f"the layer below's reconstruction {list(shape)} of the same rows in the coding frame")
    expect(isinstance(previous, (tuple, list)) and len(previous) == 2, "previous: expected a (key, value) pair")
    for name, t in zip(("previous key", "previous value"), previous):
        check_tensor(name, t, shape, FLOAT_DTYPES, device, inner_contiguous=False)
    return tuple(t.contiguous() for t in previous)  # rows read with a fixed [H * D] stride


def _tile(block_size: int) -> int:
    expect(block_size >= 16 and block_size & (block_size - 1) == 0,
           f"transform kernels need a power-of-two block size >= 16 (tensor-core tile), got {block_size}")
    return min(block_size, 32)


def reconstruct_transform_blocks(pages: torch.Tensor, block_ids: torch.Tensor, params: TransformLayerParams,
                                 previous: tuple[torch.Tensor, torch.Tensor] | None = None,
                                 rope: torch.Tensor | None = None, block_positions: torch.Tensor | None = None,
                                 out_dtype: torch.dtype = torch.float32, precision: str = "ieee",
                                 keep_code_frame: bool = False):
    """Decode whole pages of one layer: ``block_ids`` int ``[M]`` (``-1``: unused entry, zeros)
    -> K, V ``out_dtype [M * bs, H, D]`` in token order (page ``block_ids[0]`` first).

    ``previous``: ``(K, V)`` ``[M * bs, H, D]``, the previous layer's reconstruction of the same
    rows in the coding frame (required exactly when the layer is cross-layer predicted).
    ``rope`` (:func:`~vllm_seqkv.kernels.params.rope_cache`, ``[P, D]``) with
    ``block_positions`` int ``[M]`` (position of each page's first slot): keys come back
    RoPE-rotated (model frame); ``keep_code_frame`` then also returns the pre-RoPE keys
    (what the next layer's ``previous`` needs): ``(K, V, K_code)``.
    """
    check_pages(pages, params)
    check_tensor("block_ids", block_ids, (None,), INDEX_DTYPES, pages.device)
    expect(out_dtype in FLOAT_DTYPES, f"out_dtype: expected one of {FLOAT_DTYPES}, got {out_dtype}")
    expect(precision in PRECISIONS, f"precision: expected one of {list(PRECISIONS)}, got {precision!r}")
    heads, dim, block_size = params.num_kv_heads, params.head_dim, pages.shape[2]
    tile = _tile(block_size)
    expect(pages.stride(3) == 1, f"pages: last dimension must be contiguous, strides {pages.stride()}")
    num = block_ids.shape[0]
    rows = num * block_size
    previous = check_previous(previous, (rows, params.num_kv_heads, params.head_dim), params,
                              pages.device)
    if rope is not None:
        check_tensor("rope", rope, (None, dim), (torch.float32,), pages.device)
        expect(rope.is_contiguous(), "rope: must be contiguous")
        expect(block_positions is not None, "rope needs block_positions (first position of each page)")
        check_tensor("block_positions", block_positions, (num,), INDEX_DTYPES, pages.device)
    else:
        expect(not keep_code_frame, "keep_code_frame only makes sense with rope")
    key = torch.empty(rows, heads, dim, device=pages.device, dtype=out_dtype)
    value = torch.empty_like(key)
    key_code = torch.empty_like(key) if keep_code_frame else key
    if num:
        k, v = params.key, params.value
        prev_k, prev_v = previous if previous is not None else (key, key)
        reconstruct_transform_kernel[(num, block_size // tile, heads)](
            pages, block_ids.contiguous(), block_positions.contiguous() if rope is not None else block_ids,
            rope if rope is not None else k.mean, key, value, key_code, prev_k, prev_v,
            k.start, k.nbits, k.level_start, k.levels, k.inverse, k.mean, k.pred_w, k.pred_b,
            v.start, v.nbits, v.level_start, v.levels, v.inverse, v.mean, v.pred_w, v.pred_b,
            heads, pages.stride(0), pages.stride(1), pages.stride(2),
            BLOCK_SIZE=block_size, TILE=tile, D=dim, K_OFF=k.offset, V_OFF=v.offset,
            K_PRED=k.has_pred, V_PRED=v.has_pred, ROPE=rope is not None, KEEP_CODE=keep_code_frame,
            PRECISION=PRECISIONS[precision])
    return (key, value, key_code) if keep_code_frame else (key, value)


def table_block_ids(block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int):
    """A block table ``[B, max_blocks]`` -> (block_ids ``[B * max_blocks]`` with -1 past each
    sequence's last page, block_positions ``[B * max_blocks]``): the flat inputs of
    :func:`reconstruct_transform_blocks` whose output viewed as ``[B, max_blocks * bs, H, D]``
    holds sequence ``b``'s positions ``0..seq_lens[b]-1`` in row ``b``."""
    batch, max_blocks = block_table.shape
    j = torch.arange(max_blocks, device=block_table.device)
    used = j[None, :] * block_size < seq_lens[:, None].to(j.dtype)
    ids = torch.where(used, block_table.to(torch.int64), torch.full_like(block_table, -1, dtype=torch.int64))
    return ids.reshape(-1).contiguous(), (j * block_size).repeat(batch).contiguous()


def reconstruct_transform_table(pages: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                                params: TransformLayerParams, previous=None, rope: torch.Tensor | None = None,
                                out_dtype: torch.dtype = torch.float32, precision: str = "ieee",
                                keep_code_frame: bool = False):
    """A batch's block table -> K, V ``[B, max_blocks * bs, H, D]`` (positions past
    ``seq_lens[b]`` in a used page hold that slot's decode, whole unused pages zeros);
    ``previous``: the previous layer's output of this function (coding frame), same shape."""
    check_tensor("block_table", block_table, (None, None), INDEX_DTYPES, pages.device)
    check_tensor("seq_lens", seq_lens, (block_table.shape[0],), INDEX_DTYPES, pages.device)
    batch, max_blocks = block_table.shape
    block_size = pages.shape[2]
    ids, positions = table_block_ids(block_table, seq_lens, block_size)
    if previous is not None:
        previous = tuple(p.reshape(batch * max_blocks * block_size, *p.shape[2:]) for p in previous)
    out = reconstruct_transform_blocks(pages, ids, params, previous, rope,
                                       positions if rope is not None else None, out_dtype, precision,
                                       keep_code_frame)
    return tuple(t.view(batch, max_blocks * block_size, *t.shape[1:]) for t in out)


def transform_decode_attention(query: torch.Tensor, own_k: torch.Tensor, own_v: torch.Tensor,
                               pages: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                               params: TransformLayerParams, scale: float, rope: torch.Tensor | None = None,
                               previous=None, precision: str = "ieee", kv_dtype: torch.dtype | None = None):
    """One decode step by "reconstruct + SDPA": query ``[B, Hq, D]`` (post-RoPE), own_k/own_v
    ``[B, H, D]`` (the new token, exact, post-RoPE) -> ``[B, Hq, D]`` (query's dtype).

    Sequence ``b`` attends to its decoded positions ``0..seq_lens[b]-2`` (keys RoPE-rotated in
    the kernel when ``rope`` is given; pass None when the layout's keys are not pre-RoPE) and
    to its own K/V at ``seq_lens[b]-1``. ``kv_dtype`` (default: the query's) is the dtype of the
    reconstructed K/V handed to SDPA. ``paged_decode_attention`` runs the fused kernel
    (:mod:`.decode`) instead; this one stays as its baseline in the benchmark.
    """
    batch, q_heads, dim = query.shape
    heads = params.num_kv_heads
    check_tensor("query", query, (None, None, dim), FLOAT_DTYPES, pages.device)
    expect(q_heads % heads == 0, f"query heads {q_heads} not a multiple of kv heads {heads}")
    for name, t in (("own_k", own_k), ("own_v", own_v)):
        check_tensor(name, t, (batch, heads, dim), FLOAT_DTYPES, pages.device)
    kv_dtype = kv_dtype or query.dtype
    key, value = reconstruct_transform_table(pages, block_table, seq_lens, params, previous, rope,
                                             out_dtype=kv_dtype, precision=precision)[:2]
    length = key.shape[1]
    last = (seq_lens.long() - 1).clamp(min=0)
    index = torch.arange(batch, device=pages.device)
    key[index, last] = own_k.to(kv_dtype)
    value[index, last] = own_v.to(kv_dtype)
    k, v = key.transpose(1, 2), value.transpose(1, 2)  # [B, H, L, D]
    mask = torch.arange(length, device=pages.device)[None, :] < seq_lens[:, None]  # [B, L]
    attended = torch.nn.functional.scaled_dot_product_attention(
        query.to(kv_dtype)[:, :, None], k, v, attn_mask=mask[:, None, None, :], scale=scale,
        enable_gqa=q_heads != heads)
    return attended[:, :, 0].to(query.dtype)
