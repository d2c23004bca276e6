"""Write path of the transform format: code new tokens' K/V into their page slots (Triton).

One launch, grid ``[ceil(T / TILE), H]``; for ``TILE`` tokens of one head and both streams:

    r    = x - (prev @ W + b)            (cross-layer layers; ``prev``: the layer below's
                                           reconstruction of the same tokens, coding frame)
    z    = (r - mean) @ basis             (tl.dot, fp32)
    code = #{thresholds < z}              (binary search over the component's 255 padded
                                           decision thresholds: the codec's ``searchsorted``)
    byte = sum over components of their code bits shifted to ``start`` (a one-hot tl.dot:
           bits of different components never overlap, so the sum is an exact OR)

and stores the bytes at ``pages[slot // bs, h, slot % bs]`` (slot ``-1``: padding, skipped).
Keys must be in the coding frame (pre-RoPE), as :meth:`SlotLayout.encode` takes them.
Non-finite inputs are not refused here (that would cost a device sync per step; the codec's
``encode`` refuses them): a component whose z is NaN codes as 0, one at ±inf as an extreme level.

Exactness. Everything after ``z`` is integer and exact. ``z`` (and the prediction) are
float32 dot products whose summation order differs from torch's ``einsum``/``matmul``, so a
component's code can differ from :meth:`SlotLayout.encode`'s only when the reference ``z``
lies within a few float32 ulps of ``|x| |basis|`` of one of its decision thresholds (then
either code is a nearest level up to rounding). Tests check (a) identical bytes on inputs
where every product and sum is exact in float32 (dyadic grid), and (b) on real-valued inputs
a flip rate below 1e-3 of components with every flipped code adjacent (±1) to the
reference's and its ``z`` within 1e-4 (relative) of the threshold between them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_seqkv.kernels.checks import FLOAT_DTYPES, INDEX_DTYPES, check_pages, check_tensor, expect
from vllm_seqkv.kernels.params import TransformLayerParams
from vllm_seqkv.kernels.reconstruct import predict_columns


@triton.jit
def encode_transform_stream(x_ptr, stride_xt, stride_xh, rows, row_mask, h, num_heads,
                            prev_k_ptr, prev_v_ptr, w_ptr, b_ptr, mean_ptr, basis_ptr, cuts_ptr,
                            lstart_ptr, start_ptr, nbits_ptr, slot_ptrs, slot_mask,
                            OFF: tl.constexpr, NBYTES: tl.constexpr, NB_PAD: tl.constexpr,
                            D: tl.constexpr, HAS_PRED: tl.constexpr):
    c = tl.arange(0, D)
    x = tl.load(x_ptr + rows[:, None] * stride_xt + h * stride_xh + c[None, :],
                mask=row_mask[:, None], other=0.0).to(tl.float32)
    if HAS_PRED:  # fp32 (ieee) products, as the codec's reference
        x = x - predict_columns(prev_k_ptr, prev_v_ptr, rows, row_mask, w_ptr, b_ptr, h, num_heads,
                                0, D, D, 0)
    basis = tl.load(basis_ptr + h * D * D + c[:, None] * D + c[None, :])
    z = tl.dot(x - tl.load(mean_ptr + h * D + c)[None, :], basis, input_precision="ieee")
    # code = number of thresholds < z: 8 halvings over each component's 2**nbits - 1 ascending
    # packed thresholds (a candidate past them reads nothing: +inf)
    nbits = tl.load(nbits_ptr + h * D + c)
    cut_row = cuts_ptr + tl.load(lstart_ptr + h * D + c)[None, :]
    last = ((1 << nbits) - 1)[None, :]
    code = tl.zeros([rows.shape[0], D], tl.int32)
    for step in tl.static_range(8):
        cand = code + (128 >> step)
        below = tl.load(cut_row + cand - 1, mask=cand <= last, other=float("inf")) < z
        code = tl.where(below, cand, code)
    start = tl.load(start_ptr + h * D + c)
    shifted = code << (start & 7)[None, :]
    byte0 = start >> 3
    spans = ((start & 7) + nbits) > 8
    j = tl.arange(0, NB_PAD)
    one_lo = (byte0[:, None] == j[None, :]).to(tl.float32)  # [D, NB_PAD]
    one_hi = (((byte0 + 1)[:, None] == j[None, :]) & spans[:, None]).to(tl.float32)
    packed = (tl.dot((shifted & 255).to(tl.float32), one_lo, input_precision="ieee")
              + tl.dot((shifted >> 8).to(tl.float32), one_hi, input_precision="ieee"))
    tl.store(slot_ptrs[:, None] + OFF + j[None, :], packed.to(tl.int32).to(tl.uint8),
             mask=slot_mask[:, None] & (j < NBYTES)[None, :])


@triton.jit
def write_transform_kernel(
        key_ptr, value_ptr, slot_mapping_ptr, pages_ptr, prev_k_ptr, prev_v_ptr,
        k_w, k_b, k_mean, k_basis, k_cuts, k_lstart, k_start, k_nbits,
        v_w, v_b, v_mean, v_basis, v_cuts, v_lstart, v_start, v_nbits,
        num_tokens, num_heads, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_pb, stride_ph, stride_pt,
        BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, D: tl.constexpr,
        K_OFF: tl.constexpr, K_NBYTES: tl.constexpr, K_NB_PAD: tl.constexpr, K_PRED: tl.constexpr,
        V_OFF: tl.constexpr, V_NBYTES: tl.constexpr, V_NB_PAD: tl.constexpr, V_PRED: tl.constexpr):
    h = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    row_mask = rows < num_tokens
    slot = tl.load(slot_mapping_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    slot_mask = slot >= 0
    safe = tl.where(slot_mask, slot, 0)
    slot_ptrs = (pages_ptr + (safe // BLOCK_SIZE) * stride_pb + h * stride_ph
                 + (safe % BLOCK_SIZE) * stride_pt)
    encode_transform_stream(key_ptr, stride_kt, stride_kh, rows, row_mask, h, num_heads, prev_k_ptr,
                            prev_v_ptr, k_w, k_b, k_mean, k_basis, k_cuts, k_lstart, k_start,
                            k_nbits, slot_ptrs, slot_mask, K_OFF, K_NBYTES, K_NB_PAD, D, K_PRED)
    encode_transform_stream(value_ptr, stride_vt, stride_vh, rows, row_mask, h, num_heads, prev_k_ptr,
                            prev_v_ptr, v_w, v_b, v_mean, v_basis, v_cuts, v_lstart, v_start,
                            v_nbits, slot_ptrs, slot_mask, V_OFF, V_NBYTES, V_NB_PAD, D, V_PRED)


def check_write_args(key, value, slot_mapping, pages, params: TransformLayerParams, previous):
    """Argument checks of the transform write (Triton and CUDA op); returns ``previous`` made
    contiguous (None for layers that are not cross-layer predicted)."""
    from vllm_seqkv.kernels.reconstruct import check_previous

    check_pages(pages, params)
    heads, dim = params.num_kv_heads, params.head_dim
    check_tensor("key", key, (None, heads, dim), FLOAT_DTYPES, pages.device)
    tokens = key.shape[0]
    check_tensor("value", value, (tokens, heads, dim), FLOAT_DTYPES, pages.device)
    check_tensor("slot_mapping", slot_mapping, (tokens,), INDEX_DTYPES, pages.device)
    expect(pages.stride(3) == 1, f"pages: last dimension must be contiguous, strides {pages.stride()}")
    return check_previous(previous, (tokens, heads, dim), params, pages.device)


def write_transform_slots(key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor,
                          pages: torch.Tensor, params: TransformLayerParams, previous=None) -> None:
    """key (coding frame) / value ``[T, H, D]`` (any float dtype, last dim contiguous),
    slot_mapping int ``[T]`` (-1 = skip), pages uint8 ``[N, H, bs, S]`` written in place;
    ``previous``: ``(K, V) [T, H, D]``, the layer below's reconstruction of the same tokens
    (required exactly when the layer is cross-layer predicted)."""
    previous = check_write_args(key, value, slot_mapping, pages, params, previous)
    heads, dim, tokens = params.num_kv_heads, params.head_dim, key.shape[0]
    if tokens == 0:
        return
    k, v = params.key, params.value
    prev_k, prev_v = previous if previous is not None else (key, key)
    tile = 16
    write_transform_kernel[(triton.cdiv(tokens, tile), heads)](
        key, value, slot_mapping.contiguous(), pages, prev_k, prev_v,
        k.pred_w, k.pred_b, k.mean, k.basis, k.cuts, k.level_start, k.start, k.nbits,
        v.pred_w, v.pred_b, v.mean, v.basis, v.cuts, v.level_start, v.start, v.nbits,
        tokens, heads, key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        pages.stride(0), pages.stride(1), pages.stride(2),
        BLOCK_SIZE=pages.shape[2], TILE=tile, D=dim,
        K_OFF=k.offset, K_NBYTES=k.nbytes, K_NB_PAD=max(16, triton.next_power_of_2(k.nbytes)),
        K_PRED=k.has_pred,
        V_OFF=v.offset, V_NBYTES=v.nbytes, V_NB_PAD=max(16, triton.next_power_of_2(v.nbytes)),
        V_PRED=v.has_pred)
