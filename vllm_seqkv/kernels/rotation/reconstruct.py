"""Prefill path: decode whole compressed pages back to K/V (Triton, grid ``[M, H]``).

The backend calls it for the blocks of a prefill chunk, then runs any dense attention.
The inverse rotation is one ``[bs, D] x [D, D]`` product with the Hadamard matrix.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_seqkv.kernels.checks import INDEX_DTYPES, check_pages, check_tensor
from vllm_seqkv.kernels.rotation.params import LayerKernelParams
from vllm_seqkv.kernels.triton_common import load_centroids, load_norm


@triton.jit
def decode_stream(slots, out_ptrs, codebook_ptr, signs_ptr, weight_ptr, mean_ptr, hadamard,
                  inv_sqrt_d, h, D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BITS_A: tl.constexpr,
                  BITS_B: tl.constexpr, NORM: tl.constexpr, OFF_A: tl.constexpr, OFF_B: tl.constexpr):
    d = tl.arange(0, D)
    everywhere = tl.full([BLOCK_SIZE], 1, tl.int1)
    norm = load_norm(slots, NORM, everywhere)
    centroids = load_centroids(slots, everywhere, codebook_ptr, D, BITS_A, BITS_B, OFF_A, OFF_B)
    rotated = tl.dot(centroids, hadamard, input_precision="ieee")  # H symmetric: c @ H = (H c)^T
    scale = tl.load(signs_ptr + d) * inv_sqrt_d / tl.load(weight_ptr + h * D + d)
    x = rotated * norm[:, None] * scale[None, :] + tl.load(mean_ptr + h * D + d)[None, :]
    tl.store(out_ptrs, x)


@triton.jit
def reconstruct_kernel(pages_ptr, block_ids_ptr, key_ptr, value_ptr, hadamard_ptr,
                       codebook_k_ptr, signs_k_ptr, weight_k_ptr, mean_k_ptr,
                       codebook_v_ptr, signs_v_ptr, weight_v_ptr, mean_v_ptr,
                       num_heads, stride_pb, stride_ph, stride_pt, inv_sqrt_d,
                       BLOCK_SIZE: tl.constexpr, D: tl.constexpr,
                       K_BITS_A: tl.constexpr, K_BITS_B: tl.constexpr, K_NORM: tl.constexpr,
                       K_OFF_A: tl.constexpr, K_OFF_B: tl.constexpr,
                       V_BITS_A: tl.constexpr, V_BITS_B: tl.constexpr, V_NORM: tl.constexpr,
                       V_OFF_A: tl.constexpr, V_OFF_B: tl.constexpr):
    """Page ``block_ids[m]``, head ``h`` -> key/value float32 ``[M, bs, H, D]`` rows ``[m, :, h]``."""
    m = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, D)
    n = tl.arange(0, BLOCK_SIZE)
    block = tl.load(block_ids_ptr + m).to(tl.int64)
    slots = pages_ptr + block * stride_pb + h * stride_ph + n.to(tl.int64) * stride_pt
    hadamard = tl.load(hadamard_ptr + d[:, None] * D + d[None, :])
    rows = (m * BLOCK_SIZE + n).to(tl.int64) * num_heads + h
    out = rows[:, None] * D + d[None, :]
    decode_stream(slots, key_ptr + out, codebook_k_ptr, signs_k_ptr, weight_k_ptr, mean_k_ptr,
                  hadamard, inv_sqrt_d, h, D, BLOCK_SIZE, K_BITS_A, K_BITS_B, K_NORM, K_OFF_A, K_OFF_B)
    decode_stream(slots, value_ptr + out, codebook_v_ptr, signs_v_ptr, weight_v_ptr, mean_v_ptr,
                  hadamard, inv_sqrt_d, h, D, BLOCK_SIZE, V_BITS_A, V_BITS_B, V_NORM, V_OFF_A, V_OFF_B)


def reconstruct_blocks_triton(pages: torch.Tensor, block_ids: torch.Tensor,
                              params: LayerKernelParams) -> tuple[torch.Tensor, torch.Tensor]:
    """pages uint8 ``[N, H, bs, S]``, block_ids int ``[M]`` -> K, V float32 ``[M * bs, H, D]``
    (token order: page ``block_ids[0]`` first). Needs ``bs >= 16`` (tensor-core tile)."""
    check_pages(pages, params)
    check_tensor("block_ids", block_ids, (None,), INDEX_DTYPES, pages.device)
    heads, dim, block_size = params.num_kv_heads, params.head_dim, pages.shape[2]
    num = block_ids.shape[0]
    key = torch.empty(num * block_size, heads, dim, device=pages.device, dtype=torch.float32)
    value = torch.empty_like(key)
    if num == 0:
        return key, value
    k, v = params.key, params.value
    reconstruct_kernel[(num, heads)](
        pages, block_ids.contiguous(), key, value, params.hadamard,
        k.codebook, k.signs, k.weight, k.mean, v.codebook, v.signs, v.weight, v.mean,
        heads, pages.stride(0), pages.stride(1), pages.stride(2), dim ** -0.5,
        BLOCK_SIZE=block_size, D=dim,
        K_BITS_A=k.bits_a, K_BITS_B=k.bits_b, K_NORM=k.norm_offset,
        K_OFF_A=k.codes_a_offset, K_OFF_B=k.codes_b_offset,
        V_BITS_A=v.bits_a, V_BITS_B=v.bits_b, V_NORM=v.norm_offset,
        V_OFF_A=v.codes_a_offset, V_OFF_B=v.codes_b_offset)
    return key, value
