"""Triton paged decode attention vs the torch reference (codec decode + SDPA)."""

import pytest
import torch

from tests.kernels.helpers import TOLERANCES, build_cache
from vllm_seqkv.kernels.checks import KernelArgumentError
from vllm_seqkv.kernels.rotation.decode_attention import paged_decode_attention_triton
from vllm_seqkv.kernels.shared import choose_splits
from vllm_seqkv.kernels.reference import paged_decode_attention_reference


def decode_inputs(cache, q_heads, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch, heads, dim = cache.seq_lens.shape[0], cache.pages.shape[1], cache.layout.head_dim
    device = cache.pages.device
    mean = cache.layout.key.predictor.mean
    query = torch.randn(batch, q_heads, dim, generator=gen).to(device, dtype)
    own_k = (mean + torch.randn(batch, heads, dim, generator=gen)).to(device, dtype)
    own_v = torch.randn(batch, heads, dim, generator=gen).to(device, dtype)
    return query, own_k, own_v


def run_both(cache, q_heads, dtype, num_splits=None):
    query, own_k, own_v = decode_inputs(cache, q_heads, dtype)
    scale = cache.layout.head_dim ** -0.5
    out = paged_decode_attention_triton(query, own_k, own_v, cache.pages, cache.block_table,
                                        cache.seq_lens, cache.params, scale, num_splits=num_splits)
    ref = paged_decode_attention_reference(query.float(), own_k.float(), own_v.float(), cache.pages,
                                           cache.block_table, cache.seq_lens, cache.layout, scale)
    return out, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("dim", [32, 64, 128])
def test_matches_reference_on_mixed_lengths(dim, group, block_size, dtype, device):
    heads = 2
    lengths = [1, block_size, block_size + 3, 2 * block_size + 7]  # own-token only, exact and ragged
    cache = build_cache(lengths, heads, dim, block_size, device, seed=dim + group)
    out, ref = run_both(cache, heads * group, dtype, num_splits=2)
    assert out.dtype == dtype and out.shape == (len(lengths), heads * group, dim)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.float().cpu(), ref.float().cpu(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("num_splits", [1, 3, 7, None])
def test_split_k_reduction_is_exact(num_splits, device):
    cache = build_cache([150, 37], heads=1, dim=32, block_size=16, device=device, seed=3)
    out, ref = run_both(cache, 3, torch.float32, num_splits=num_splits)
    torch.testing.assert_close(out.cpu(), ref.cpu(), atol=2e-4, rtol=2e-4)


def test_auto_split_count():
    assert choose_splits(batch=1, kv_heads=8, max_pages=8192) == 64
    assert choose_splits(batch=64, kv_heads=8, max_pages=8192) == 1
    assert choose_splits(batch=1, kv_heads=1, max_pages=3) == 1


def test_own_token_is_read_exactly_not_from_the_cache(device):
    """Overwriting the cache slot of the last position must not change the output."""
    cache = build_cache([20], heads=1, dim=32, block_size=16, device=device)
    query, own_k, own_v = decode_inputs(cache, 1, torch.float32)
    args = (query, own_k, own_v, cache.pages, cache.block_table, cache.seq_lens, cache.params, 32 ** -0.5)
    before = paged_decode_attention_triton(*args)
    cache.pages[cache.block_table[0, 1].long(), :, 3] = 0  # position 19 = 16 + 3
    torch.testing.assert_close(paged_decode_attention_triton(*args), before)


def test_bad_arguments_are_clear_errors(device):
    cache = build_cache([5], heads=2, dim=32, block_size=16, device=device)
    query, own_k, own_v = decode_inputs(cache, 4, torch.float32)
    base = dict(query=query, own_k=own_k, own_v=own_v, pages=cache.pages,
                block_table=cache.block_table, seq_lens=cache.seq_lens, params=cache.params, scale=1.0)
    cases = {
        "query": (query[..., :16], "query: expected shape"),
        "own_k": (own_k.half(), "own_k: expected dtype"),
        "pages": (cache.pages.view(torch.int8), "pages: expected dtype"),
        "block_table": (cache.block_table.float(), "block_table: expected dtype"),
        "seq_lens": (cache.seq_lens[:0], "seq_lens: expected shape"),
    }
    for name, (bad, message) in cases.items():
        with pytest.raises(KernelArgumentError, match=message):
            paged_decode_attention_triton(**{**base, name: bad})
    with pytest.raises(KernelArgumentError, match="not a multiple of kv heads"):
        paged_decode_attention_triton(**{**base, "query": query[:, :3]})
