"""Write path: code new tokens' K/V into their page slots.

The predictor, norm and rotation run in torch with the codec's own code order (so the
rotated coordinates are bit-identical to :class:`~vllm_seqkv.codec.base.SlotLayout.encode`);
one Triton launch (grid ``[T, H]``) then quantizes (Lloyd-Max thresholds), bit-packs and
scatters each token-head into ``pages[slot // bs, h, slot % bs]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_seqkv.codec.baselines import TINY
from vllm_seqkv.codec.hadamard import fwht
from vllm_seqkv.kernels.checks import FLOAT_DTYPES, INDEX_DTYPES, check_pages, check_tensor
from vllm_seqkv.kernels.rotation.params import LayerKernelParams, StreamParams


def rotate_stream(x: torch.Tensor, stream: StreamParams) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [T, H, D]`` -> unit rotated residual float32 ``[T, H, D]``, fp16 norm ``[T, H, 1]``.

    Same operations, same order as PredictiveCodec.encode -> TurboCodec.encode.
    """
    residual = (x.float() - stream.mean) * stream.weight
    norm = residual.norm(dim=-1, keepdim=True).half()
    unit = fwht(residual / norm.float().clamp_min(TINY) * stream.signs) * x.shape[-1] ** -0.5
    return unit.contiguous(), norm


@triton.jit
def pack_half(unit_row, slot, boundaries_ptr, FIRST_COORD: tl.constexpr, BITS: tl.constexpr,
              FIELD: tl.constexpr, NBYTES: tl.constexpr, NBYTES_PAD: tl.constexpr):
    """Quantize ``unit_row[FIRST_COORD:FIRST_COORD + 8*NBYTES/BITS]`` and store the bit stream."""
    j = tl.arange(0, NBYTES_PAD)
    k = tl.arange(0, 8)
    in_field = j < NBYTES
    bit = j[:, None] * 8 + k[None, :]  # [NB, 8] position in the field's bit stream
    coord = bit // BITS
    u = tl.load(unit_row + FIRST_COORD + coord, mask=in_field[:, None], other=0.0)
    code = tl.zeros([NBYTES_PAD, 8], tl.int32)
    for level in tl.static_range((1 << BITS) - 1):
        code += (u > tl.load(boundaries_ptr + level)).to(tl.int32)
    bits = ((code >> (bit % BITS)) & 1) << k[None, :]
    tl.store(slot + FIELD + j, tl.sum(bits, axis=1).to(tl.uint8), mask=in_field)


@triton.jit
def write_stream(unit_row, norm_bytes, slot, boundaries_ptr, D: tl.constexpr,
                 BITS_A: tl.constexpr, BITS_B: tl.constexpr, NORM: tl.constexpr,
                 OFF_A: tl.constexpr, OFF_B: tl.constexpr):
    tl.store(slot + NORM, tl.load(norm_bytes))
    tl.store(slot + NORM + 1, tl.load(norm_bytes + 1))
    NB_A: tl.constexpr = D // 2 * BITS_A // 8
    NB_B: tl.constexpr = D // 2 * BITS_B // 8
    pack_half(unit_row, slot, boundaries_ptr, 0, BITS_A, OFF_A, NB_A, triton.next_power_of_2(NB_A))
    pack_half(unit_row, slot, boundaries_ptr + (1 << BITS_A) - 1, D // 2, BITS_B, OFF_B, NB_B,
              triton.next_power_of_2(NB_B))


@triton.jit
def write_slots_kernel(unit_k_ptr, norm_k_ptr, unit_v_ptr, norm_v_ptr, slot_mapping_ptr, pages_ptr,
                       bounds_k_ptr, bounds_v_ptr, num_heads, stride_pb, stride_ph, stride_pt,
                       BLOCK_SIZE: tl.constexpr, D: tl.constexpr,
                       K_BITS_A: tl.constexpr, K_BITS_B: tl.constexpr, K_NORM: tl.constexpr,
                       K_OFF_A: tl.constexpr, K_OFF_B: tl.constexpr,
                       V_BITS_A: tl.constexpr, V_BITS_B: tl.constexpr, V_NORM: tl.constexpr,
                       V_OFF_A: tl.constexpr, V_OFF_B: tl.constexpr):
    """unit_k/v float32 ``[T, H, D]``, norm_k/v fp16 bytes ``[T, H, 2]``; slot -1 = padding."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot_id = tl.load(slot_mapping_ptr + t).to(tl.int64)
    if slot_id >= 0:
        slot = (pages_ptr + (slot_id // BLOCK_SIZE) * stride_pb + h * stride_ph
                + (slot_id % BLOCK_SIZE) * stride_pt)
        row = t * num_heads + h
        write_stream(unit_k_ptr + row * D, norm_k_ptr + row * 2, slot, bounds_k_ptr, D,
                     K_BITS_A, K_BITS_B, K_NORM, K_OFF_A, K_OFF_B)
        write_stream(unit_v_ptr + row * D, norm_v_ptr + row * 2, slot, bounds_v_ptr, D,
                     V_BITS_A, V_BITS_B, V_NORM, V_OFF_A, V_OFF_B)


def check_write_args(key, value, slot_mapping, pages, params: LayerKernelParams) -> None:
    check_pages(pages, params)
    heads, dim = params.num_kv_heads, params.head_dim
    check_tensor("key", key, (None, heads, dim), FLOAT_DTYPES, pages.device, inner_contiguous=False)
    tokens = key.shape[0]
    check_tensor("value", value, (tokens, heads, dim), FLOAT_DTYPES, pages.device, inner_contiguous=False)
    check_tensor("slot_mapping", slot_mapping, (tokens,), INDEX_DTYPES, pages.device)


def write_slots_triton(key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor,
                       pages: torch.Tensor, params: LayerKernelParams) -> None:
    """key/value ``[T, H, D]`` (any float dtype), slot_mapping int ``[T]`` (-1 = skip),
    pages uint8 ``[N, H, bs, S]`` written in place."""
    check_write_args(key, value, slot_mapping, pages, params)
    tokens, heads, dim = key.shape
    if tokens == 0:
        return
    unit_k, norm_k = rotate_stream(key, params.key)
    unit_v, norm_v = rotate_stream(value, params.value)
    k, v = params.key, params.value
    write_slots_kernel[(tokens, heads)](
        unit_k, norm_k.view(torch.uint8).contiguous(), unit_v, norm_v.view(torch.uint8).contiguous(),
        slot_mapping.contiguous(), pages, k.boundaries, v.boundaries, heads,
        pages.stride(0), pages.stride(1), pages.stride(2), BLOCK_SIZE=pages.shape[2], D=dim,
        K_BITS_A=k.bits_a, K_BITS_B=k.bits_b, K_NORM=k.norm_offset,
        K_OFF_A=k.codes_a_offset, K_OFF_B=k.codes_b_offset,
        V_BITS_A=v.bits_a, V_BITS_B=v.bits_b, V_NORM=v.norm_offset,
        V_OFF_A=v.codes_a_offset, V_OFF_B=v.codes_b_offset)
