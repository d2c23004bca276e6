"""Fused transform-format decode attention (Triton) vs the codec's decode + SDPA reference.

Small on purpose: every case runs in Triton's interpreter on CPU (TRITON_INTERPRET=1).
"""

import pytest
import torch

from tests.kernels.conftest import ON_GPU
from tests.kernels.transform_helpers import THETA, TRANSFORM_TOLERANCES, build_transform_cache
from vllm_seqkv import kernels
from vllm_seqkv.kernels.checks import KernelArgumentError
from vllm_seqkv.kernels.reference import reconstruct_transform_reference, transform_decode_attention_reference
from vllm_seqkv.kernels.decode import TILE, fused_transform_decode_attention
from vllm_seqkv.kernels.params import rope_cache
from vllm_seqkv.codec.presets import PRESETS
from vllm_seqkv.kernels.reconstruct import table_block_ids

# (preset, kv heads, head_dim, GQA group, block size, layer, query dtype, rope, splits):
# layer 1 of seqkv-2/2.5/3/4 is cross-layer predicted, seqkv-3-nox never is
CASES = [
    ("seqkv-3-nox", 2, 32, 3, 16, 1, torch.float32, True, 3),
    ("seqkv-3-nox", 1, 64, 4, 128, 0, torch.float16, False, None),
    ("seqkv-3", 2, 64, 1, 16, 1, torch.float32, True, 3),
    ("seqkv-2.5", 3, 32, 4, 8, 1, torch.float16, True, 2),
    ("seqkv-4", 1, 32, 3, 32, 0, torch.bfloat16, True, 4),
    ("seqkv-f4", 2, 64, 3, 16, 1, torch.float32, True, 2),  # the default preset's format
]


def lengths_for(block_size):
    """Own token only, short, ragged past a page, and one spanning several tiles (and splits)."""
    return [1, 5, block_size + 3, max(6 * TILE, 2 * block_size) + 5]


def coding_frame_previous(cache, device):
    """Layer 0's reference reconstruction of the whole table, ``[B, max_blocks * bs, H, D]``."""
    block_size = cache.pages[0].shape[2]
    ids, _ = table_block_ids(cache.block_table.cpu(), cache.seq_lens.cpu(), block_size)
    batch = cache.block_table.shape[0]
    return tuple(t.reshape(batch, -1, *t.shape[1:]).to(device).contiguous()
                 for t in reconstruct_transform_reference(cache.pages[0].cpu(), ids, cache.layouts[0]))


def decode_inputs(batch, heads, group, dim, dtype, device):
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(batch, heads * group, dim, generator=gen).to(device, dtype)
    own_k, own_v = (torch.randn(batch, heads, dim, generator=gen).to(device, dtype) for _ in range(2))
    return query, own_k, own_v


def reference(cache, layer, query, own_k, own_v, rope, previous):
    dim = query.shape[-1]
    return transform_decode_attention_reference(
        query.float(), own_k.float(), own_v.float(), cache.pages[layer], cache.block_table, cache.seq_lens,
        cache.layouts[layer], dim ** -0.5, rope=rope, previous=previous)


def setup_case(preset, heads, dim, group, block_size, layer, dtype, rope, device):
    cache = build_transform_cache(preset, heads, dim, block_size, lengths_for(block_size), seed=dim).to(device)
    params = cache.params(layer, device)
    assert params.cross_layer == (layer == 1 and PRESETS[preset].cross_layer)
    previous = coding_frame_previous(cache, device) if params.cross_layer else None
    rows = cache.block_table.shape[1] * block_size  # the reference rotates whole pages
    table = rope_cache(rows, dim, THETA, device) if rope else None
    inputs = decode_inputs(cache.seq_lens.shape[0], heads, group, dim, dtype, device)
    return cache, params, previous, table, inputs


@pytest.mark.parametrize("preset, heads, dim, group, block_size, layer, dtype, rope, splits", CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_matches_reference_on_mixed_lengths(preset, heads, dim, group, block_size, layer, dtype, rope,
                                           splits, device):
    cache, params, previous, table, (query, own_k, own_v) = setup_case(
        preset, heads, dim, group, block_size, layer, dtype, rope, device)
    out = fused_transform_decode_attention(query, own_k, own_v, cache.pages[layer], cache.block_table,
                                           cache.seq_lens, params, dim ** -0.5, rope=table, previous=previous,
                                           num_splits=splits)
    ref = reference(cache, layer, query, own_k, own_v, table, previous)
    assert out.dtype == dtype and out.shape == query.shape
    atol, rtol = TRANSFORM_TOLERANCES[dtype]
    torch.testing.assert_close(out.float().cpu(), ref.float().cpu(), atol=atol, rtol=rtol)
    own_only = own_v[0].repeat_interleave(group, 0)  # a length-1 sequence attends to its own token only
    torch.testing.assert_close(out[0].float().cpu(), own_only.float().cpu(), atol=atol, rtol=rtol)


# tf32 and fp16 keep 10 mantissa bits, bf16 7; the interpreter multiplies bf16 as raw bits (GPU only)
PRECISION_TOLERANCES = {"tf32": 1e-2, "fp16": 1e-2, **({"bf16": 5e-2} if ON_GPU else {})}


@pytest.mark.parametrize("precision", list(PRECISION_TOLERANCES))
def test_tensor_core_precisions_stay_close(precision, device):
    cache, params, previous, table, (query, own_k, own_v) = setup_case(
        "seqkv-3", 2, 32, 2, 16, 1, torch.float32, True, device)
    out = fused_transform_decode_attention(query, own_k, own_v, cache.pages[1], cache.block_table,
                                           cache.seq_lens, params, 32 ** -0.5, rope=table, previous=previous,
                                           precision=precision)
    ref = reference(cache, 1, query, own_k, own_v, table, previous)
    tol = PRECISION_TOLERANCES[precision]
    torch.testing.assert_close(out.cpu(), ref.cpu(), atol=tol, rtol=tol)


def test_own_token_is_read_exactly_not_from_the_cache(device):
    """Overwriting the cache slot of each sequence's last position must not change the output."""
    cache, params, _, table, (query, own_k, own_v) = setup_case(
        "seqkv-3-nox", 1, 32, 2, 16, 0, torch.float32, True, device)
    args = (query, own_k, own_v, cache.pages[0], cache.block_table, cache.seq_lens, params, 0.2)
    before = fused_transform_decode_attention(*args, rope=table)
    for b, length in enumerate(cache.seq_lens.tolist()):
        last = length - 1
        cache.pages[0][cache.block_table[b, last // 16].long(), :, last % 16] ^= 0x5A
    torch.testing.assert_close(fused_transform_decode_attention(*args, rope=table), before)


@pytest.mark.parametrize("skip_first", [0, 3, 40])
def test_skipped_positions_and_lse_merge_back_to_the_full_attention(skip_first, device):
    """Attention over ``[skip, ...)`` with its log-sum-exp, merged with attention over the
    skipped positions, is the attention over everything (how the backend adds exact sinks)."""
    cache, params, _, table, (query, own_k, own_v) = setup_case(
        "seqkv-3-nox", 2, 32, 3, 16, 1, torch.float32, True, device)
    args = (query, own_k, own_v, cache.pages[1], cache.block_table, cache.seq_lens, params, 0.3)
    out, lse = fused_transform_decode_attention(*args, rope=table, skip_first=skip_first,
                                                return_lse=True, num_splits=3)
    ref_out, ref_lse = transform_decode_attention_reference(
        *args[:6], cache.layouts[1], 0.3, rope=table, skip_first=skip_first, return_lse=True)
    atol, rtol = TRANSFORM_TOLERANCES[torch.float32]
    torch.testing.assert_close(out.cpu(), ref_out.cpu(), atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.cpu(), ref_lse.cpu(), atol=atol, rtol=rtol)
    full, full_lse = fused_transform_decode_attention(*args, rope=table, return_lse=True)
    for b, length in enumerate(cache.seq_lens.tolist()):
        skipped = min(skip_first, length - 1)
        if skipped == 0:
            torch.testing.assert_close(out[b], full[b], atol=atol, rtol=rtol)
            continue
        blocks = cache.block_table[b, : -(-skipped // 16)]
        key, value = reconstruct_transform_reference(cache.pages[1], blocks, cache.layouts[1], None, table,
                                                     torch.arange(blocks.numel()) * 16)[:2]
        scores = torch.einsum("hd,shd->hs", query[b].float(), key[:skipped].repeat_interleave(3, 1)) * 0.3
        part = torch.einsum("hs,shd->hd", scores.softmax(-1), value[:skipped].repeat_interleave(3, 1))
        weight = torch.stack([lse[b], scores.logsumexp(-1)]).softmax(0)  # [2, Hq]
        merged = weight[0, :, None] * out[b] + weight[1, :, None] * part
        torch.testing.assert_close(merged, full[b], atol=atol, rtol=rtol)
        torch.testing.assert_close(torch.logaddexp(lse[b], scores.logsumexp(-1)), full_lse[b],
                                   atol=atol, rtol=rtol)


@pytest.mark.parametrize("layer", [0, 1])
def test_public_api_runs_the_fused_kernel_on_triton(layer, monkeypatch, device):
    monkeypatch.setenv("SEQKV_KERNELS", "triton")
    cache, params, previous, table, (query, own_k, own_v) = setup_case(
        "seqkv-3", 1, 32, 2, 16, layer, torch.float32, True, device)
    args = (query, own_k, own_v, cache.pages[layer], cache.block_table, cache.seq_lens)
    out = kernels.paged_decode_attention(*args, params, 0.3, rope=table, previous=previous)
    assert torch.equal(out, fused_transform_decode_attention(*args, params, 0.3, rope=table, previous=previous))
    if params.cross_layer:
        with pytest.raises(KernelArgumentError, match="pass previous"):
            kernels.paged_decode_attention(*args, params, 0.3, rope=table)


def test_bad_arguments_are_clear_errors(device):
    cache, params, previous, table, (query, own_k, own_v) = setup_case(
        "seqkv-3", 2, 32, 2, 16, 1, torch.float32, True, device)
    base = dict(query=query, own_k=own_k, own_v=own_v, pages=cache.pages[1], block_table=cache.block_table,
                seq_lens=cache.seq_lens, params=params, scale=1.0, rope=table, previous=previous)
    cases = {
        "query": (query[..., :16], "query: expected shape"),
        "own_k": (own_k[:, :1], "own_k: expected shape"),
        "own_v": (own_v.double(), "own_v: expected dtype"),
        "pages": (cache.pages[1].view(torch.int8), "pages: expected dtype"),
        "block_table": (cache.block_table.float(), "block_table: expected dtype"),
        "seq_lens": (cache.seq_lens[:2], "seq_lens: expected shape"),
        "rope": (table.double(), "rope: expected dtype"),
        "previous": ((previous[0][:, :16], previous[1]), "previous key: expected shape"),
        "precision": ("fp8", "precision: expected one of"),
    }
    for name, (bad, message) in cases.items():
        with pytest.raises(KernelArgumentError, match=message):
            fused_transform_decode_attention(**{**base, name: bad})
    with pytest.raises(KernelArgumentError, match="not a multiple of kv heads"):
        fused_transform_decode_attention(**{**base, "query": query[:, :3]})
    with pytest.raises(KernelArgumentError, match="pass previous"):
        fused_transform_decode_attention(**{**base, "previous": None})
