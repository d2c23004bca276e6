"""Paged decode attention over compressed slots (Triton): one query token per sequence.

Keys are never rotated back. With ``k = (n/sqrt(D)) * S H c / w + mu`` (``S = diag(signs)``,
``H`` the Hadamard matrix, ``c`` the centroid vector, ``w``/``mu`` the predictor),

    q . k = n * (q' . c) + q . mu,         q' = H S (q / w) / sqrt(D)   (once per query head)

and values are summed in the rotated domain and rotated once at the end:

    sum_j p_j v_j = S H (sum_j p_j n_j c_j) / sqrt(D) / w + mu * sum_j p_j.

Three launches: ``rotate_queries`` (grid ``[B, Hq]``), ``decode_partial`` (grid
``[B, H_kv, splits]``: a GQA group of query heads over a chunk of pages, online softmax) and
``decode_reduce`` (grid ``[B, Hq]``: merges the splits, adds the exact own token, rotates back).
The last position of each sequence is read from ``own_k``/``own_v`` (the backend's rule), so
the cache is read for positions ``[0, seq_len - 1)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_seqkv.kernels.shared import choose_splits
from vllm_seqkv.kernels.checks import FLOAT_DTYPES, INDEX_DTYPES, check_pages, check_tensor, expect
from vllm_seqkv.kernels.rotation.params import LayerKernelParams
from vllm_seqkv.kernels.triton_common import NEG_BIG, load_centroids, load_norm, split_weights



@triton.jit
def rotate_queries_kernel(q_ptr, q_rot_ptr, q_mu_ptr, signs_ptr, weight_ptr, mean_ptr, hadamard_ptr,
                          stride_qb, stride_qh, num_q_heads, inv_sqrt_d,
                          GROUP: tl.constexpr, D: tl.constexpr):
    """q_rot ``[B, Hq, D]`` = H S (q / w) / sqrt(D); q_mu ``[B, Hq]`` = q . mean."""
    b = tl.program_id(0)
    hq = tl.program_id(1)
    kvh = hq // GROUP
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * stride_qb + hq * stride_qh + d).to(tl.float32)
    scaled = q * tl.load(signs_ptr + d) / tl.load(weight_ptr + kvh * D + d)
    hadamard = tl.load(hadamard_ptr + d[:, None] * D + d[None, :])
    q_rot = tl.sum(hadamard * scaled[None, :], axis=1) * inv_sqrt_d
    out = (b * num_q_heads + hq)
    tl.store(q_rot_ptr + out * D + d, q_rot)
    tl.store(q_mu_ptr + out, tl.sum(q * tl.load(mean_ptr + kvh * D + d)))


@triton.jit
def decode_partial_kernel(q_rot_ptr, q_mu_ptr, pages_ptr, block_table_ptr, seq_lens_ptr,
                          codebook_k_ptr, codebook_v_ptr, acc_ptr, max_ptr, sum_ptr,
                          stride_pb, stride_ph, stride_pt, stride_bt,
                          num_q_heads, num_splits, pages_per_split, scale,
                          GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                          D: tl.constexpr,
                          K_BITS_A: tl.constexpr, K_BITS_B: tl.constexpr, K_NORM: tl.constexpr,
                          K_OFF_A: tl.constexpr, K_OFF_B: tl.constexpr,
                          V_BITS_A: tl.constexpr, V_BITS_B: tl.constexpr, V_NORM: tl.constexpr,
                          V_OFF_A: tl.constexpr, V_OFF_B: tl.constexpr):
    """Partial softmax state of one GQA group over one chunk of pages.

    Writes acc ``[B, Hq, splits, D]`` (rotated, unnormalised sum of p_j n_j c_j), max and
    sum ``[B, Hq, splits]``.
    """
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    cached_len = tl.load(seq_lens_ptr + b) - 1  # the last position is the exact own token
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D)
    n = tl.arange(0, BLOCK_SIZE)
    in_group = g < GROUP
    rows = b * num_q_heads + kvh * GROUP + g
    q_rot = tl.load(q_rot_ptr + rows[:, None] * D + d[None, :], mask=in_group[:, None], other=0.0)
    q_mu = tl.load(q_mu_ptr + rows, mask=in_group, other=0.0)
    run_max = tl.full([GROUP_PAD], NEG_BIG, tl.float32)
    run_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    first_page = split * pages_per_split
    num_pages = tl.minimum(tl.cdiv(cached_len, BLOCK_SIZE) - first_page, pages_per_split)
    for i in range(0, num_pages):
        page = first_page + i
        valid = page * BLOCK_SIZE + n < cached_len
        block = tl.load(block_table_ptr + b * stride_bt + page).to(tl.int64)
        slots = pages_ptr + block * stride_pb + kvh * stride_ph + n.to(tl.int64) * stride_pt
        key_norm = load_norm(slots, K_NORM, valid)
        key_c = load_centroids(slots, valid, codebook_k_ptr, D, K_BITS_A, K_BITS_B, K_OFF_A, K_OFF_B)
        dots = tl.sum(q_rot[:, None, :] * key_c[None, :, :], axis=2)  # [G, N]
        scores = (key_norm[None, :] * dots + q_mu[:, None]) * scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(scores, axis=1))
        alpha = tl.exp(run_max - new_max)
        probs = tl.exp(scores - new_max[:, None])
        run_sum = run_sum * alpha + tl.sum(probs, axis=1)
        value_norm = load_norm(slots, V_NORM, valid)
        value_c = load_centroids(slots, valid, codebook_v_ptr, D, V_BITS_A, V_BITS_B, V_OFF_A, V_OFF_B)
        weighted = (probs * value_norm[None, :])[:, :, None] * value_c[None, :, :]
        acc = acc * alpha[:, None] + tl.sum(weighted, axis=1)
        run_max = new_max
    state = rows * num_splits + split
    tl.store(acc_ptr + state[:, None] * D + d[None, :], acc, mask=in_group[:, None])
    tl.store(max_ptr + state, run_max, mask=in_group)
    tl.store(sum_ptr + state, run_sum, mask=in_group)


@triton.jit
def decode_reduce_kernel(q_ptr, own_k_ptr, own_v_ptr, out_ptr, acc_ptr, max_ptr, sum_ptr,
                         signs_ptr, weight_ptr, mean_ptr, hadamard_ptr,
                         stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
                         stride_ob, stride_oh, num_q_heads, num_splits, scale, inv_sqrt_d,
                         GROUP: tl.constexpr, SPLITS_PAD: tl.constexpr, D: tl.constexpr):
    """Merge the splits of one (sequence, query head), add the own token, rotate values back."""
    b = tl.program_id(0)
    hq = tl.program_id(1)
    kvh = hq // GROUP
    d = tl.arange(0, D)
    state, in_range, split_weight, cached_mass, own_weight, _ = split_weights(
        q_ptr, own_k_ptr, max_ptr, sum_ptr, b, hq, kvh, stride_qb, stride_qh, stride_kb, stride_kh,
        num_q_heads, num_splits, scale, SPLITS_PAD, D)
    own_v = tl.load(own_v_ptr + b * stride_vb + kvh * stride_vh + d).to(tl.float32)
    acc = tl.load(acc_ptr + state[:, None] * D + d[None, :], mask=in_range[:, None], other=0.0)
    rotated = tl.sum(split_weight[:, None] * acc, axis=0)  # [D]
    hadamard = tl.load(hadamard_ptr + d[:, None] * D + d[None, :])
    back = tl.sum(hadamard * rotated[None, :], axis=1) * inv_sqrt_d
    cached = back * tl.load(signs_ptr + d) / tl.load(weight_ptr + kvh * D + d)
    cached += tl.load(mean_ptr + kvh * D + d) * cached_mass
    out = (cached + own_weight * own_v) / (cached_mass + own_weight)
    tl.store(out_ptr + b * stride_ob + hq * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def check_decode_args(query, own_k, own_v, pages, block_table, seq_lens, params: LayerKernelParams):
    check_pages(pages, params)
    device, heads, dim = pages.device, params.num_kv_heads, params.head_dim
    check_tensor("query", query, (None, None, dim), FLOAT_DTYPES, device)
    batch, q_heads = query.shape[:2]
    expect(q_heads % heads == 0, f"query heads {q_heads} are not a multiple of kv heads {heads}")
    check_tensor("own_k", own_k, (batch, heads, dim), (query.dtype,), device)
    check_tensor("own_v", own_v, (batch, heads, dim), (query.dtype,), device)
    check_tensor("block_table", block_table, (batch, None), INDEX_DTYPES, device)
    check_tensor("seq_lens", seq_lens, (batch,), INDEX_DTYPES, device)
    expect(seq_lens.is_contiguous(), "seq_lens must be contiguous")
    expect(block_table.numel() > 0 or batch == 0, "block_table is empty")


def paged_decode_attention_triton(query: torch.Tensor, own_k: torch.Tensor, own_v: torch.Tensor,
                                  pages: torch.Tensor, block_table: torch.Tensor,
                                  seq_lens: torch.Tensor, params: LayerKernelParams, scale: float,
                                  num_splits: int | None = None) -> torch.Tensor:
    """query ``[B, Hq, D]``, own_k/own_v ``[B, H, D]`` (exact K/V of each sequence's last position),
    pages uint8 ``[N, H, bs, S]``, block_table int ``[B, max_blocks]``, seq_lens int ``[B]``
    (>= 1, including the own token) -> ``[B, Hq, D]`` in query's dtype.
    """
    check_decode_args(query, own_k, own_v, pages, block_table, seq_lens, params)
    batch, q_heads, dim = query.shape
    heads, block_size = params.num_kv_heads, pages.shape[2]
    group = q_heads // heads
    out = torch.empty_like(query)
    if batch == 0:
        return out
    max_pages = block_table.shape[1]
    splits = num_splits or choose_splits(batch, heads, max_pages)
    pages_per_split = triton.cdiv(max_pages, splits)
    f32 = dict(device=query.device, dtype=torch.float32)
    q_rot, q_mu = torch.empty(batch, q_heads, dim, **f32), torch.empty(batch, q_heads, **f32)
    acc = torch.empty(batch, q_heads, splits, dim, **f32)
    split_max, split_sum = torch.empty(batch, q_heads, splits, **f32), torch.empty(batch, q_heads, splits, **f32)
    key, value, inv_sqrt_d = params.key, params.value, dim ** -0.5
    rotate_queries_kernel[(batch, q_heads)](
        query, q_rot, q_mu, key.signs, key.weight, key.mean, params.hadamard,
        query.stride(0), query.stride(1), q_heads, inv_sqrt_d, GROUP=group, D=dim)
    decode_partial_kernel[(batch, heads, splits)](
        q_rot, q_mu, pages, block_table, seq_lens, key.codebook, value.codebook,
        acc, split_max, split_sum, pages.stride(0), pages.stride(1), pages.stride(2),
        block_table.stride(0), q_heads, splits, pages_per_split, float(scale),
        GROUP=group, GROUP_PAD=triton.next_power_of_2(group), BLOCK_SIZE=block_size, D=dim,
        K_BITS_A=key.bits_a, K_BITS_B=key.bits_b, K_NORM=key.norm_offset,
        K_OFF_A=key.codes_a_offset, K_OFF_B=key.codes_b_offset,
        V_BITS_A=value.bits_a, V_BITS_B=value.bits_b, V_NORM=value.norm_offset,
        V_OFF_A=value.codes_a_offset, V_OFF_B=value.codes_b_offset)
    decode_reduce_kernel[(batch, q_heads)](
        query, own_k, own_v, out, acc, split_max, split_sum,
        value.signs, value.weight, value.mean, params.hadamard,
        query.stride(0), query.stride(1), own_k.stride(0), own_k.stride(1),
        own_v.stride(0), own_v.stride(1), out.stride(0), out.stride(1),
        q_heads, splits, float(scale), inv_sqrt_d,
        GROUP=group, SPLITS_PAD=triton.next_power_of_2(splits), D=dim)
    return out
