"""The backend's attention over decoded slots, against torch SDPA."""

import pytest
import torch

from vllm_seqkv.integration.backend import attend


@pytest.mark.parametrize("q_len, seq_len, heads, kv_heads", [(1, 7, 4, 2), (5, 5, 9, 3), (3, 40, 2, 2)])
def test_attend_with_exact_cache_equals_causal_sdpa(q_len, seq_len, heads, kv_heads):
    torch.manual_seed(0)
    dim = 32
    q = torch.randn(q_len, heads, dim)
    k, v = torch.randn(seq_len, kv_heads, dim), torch.randn(seq_len, kv_heads, dim)
    out = attend(q, k, v, k[-q_len:], v[-q_len:], dim**-0.5)
    group = heads // kv_heads
    mask = torch.ones(q_len, seq_len, dtype=torch.bool).tril(seq_len - q_len)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(group, 1).transpose(0, 1),
        v.repeat_interleave(group, 1).transpose(0, 1), attn_mask=mask).transpose(0, 1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_own_position_is_read_exactly():
    torch.manual_seed(1)
    q = torch.randn(1, 2, 16)
    k, v = torch.randn(4, 2, 16), torch.randn(4, 2, 16)
    noisy_k, noisy_v = k.clone(), v.clone()
    noisy_k[-1] += 5
    noisy_v[-1] += 5
    exact = attend(q, k, v, k[-1:], v[-1:], 0.25)
    torch.testing.assert_close(attend(q, noisy_k, noisy_v, k[-1:], v[-1:], 0.25), exact)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2)])
def test_attend_decodes_equals_attend_per_sequence(heads, kv_heads):
    from vllm_seqkv.integration.backend import attend_decodes

    gen = torch.Generator().manual_seed(3)
    lengths, dim = [1, 7, 3, 40, 6], 16  # 40 is padded apart from the short ones
    rows = 2 + sum(lengths) + 5  # rows before, between and after the sequences are not read
    cached_k = torch.randn(rows, kv_heads, dim, generator=gen)
    cached_v = torch.randn(rows, kv_heads, dim, generator=gen)
    starts = [2 + sum(lengths[:b]) for b in range(len(lengths))]
    ends = [s + n for s, n in zip(starts, lengths)]
    query = torch.randn(len(lengths), heads, dim, generator=gen)
    own_k = torch.randn(len(lengths), kv_heads, dim, generator=gen)
    own_v = torch.randn(len(lengths), kv_heads, dim, generator=gen)
    before = cached_k.clone()
    out = attend_decodes(query, cached_k, cached_v, own_k, own_v, starts, ends, 0.3)
    for b, (s, e) in enumerate(zip(starts, ends)):
        expected = attend(query[b:b + 1], cached_k[s:e], cached_v[s:e], own_k[b:b + 1], own_v[b:b + 1], 0.3)
        torch.testing.assert_close(out[b], expected[0])
    assert torch.equal(cached_k, before)  # the own rows replace a copy


def test_decodes_are_padded_in_groups_of_similar_lengths():
    from vllm_seqkv.integration.backend import _similar_lengths

    lengths = [400, 3, 390, 5, 4000, 410]
    groups = _similar_lengths(lengths)
    assert sorted(b for g in groups for b in g) == list(range(6))
    for group in groups:
        assert len(group) * max(lengths[b] for b in group) <= 2 * sum(lengths[b] for b in group)
    assert [sorted(g) for g in groups] == [[1, 3], [0, 2, 5], [4]]


@pytest.mark.parametrize("q_len, seq_len, window", [(1, 4, 4), (5, 12, 3), (6, 6, 2)])
def test_attend_in_a_sliding_window_equals_banded_sdpa(q_len, seq_len, window):
    """Each query attends to the ``window`` positions ending at its own (vLLM/HF semantics)."""
    torch.manual_seed(2)
    dim, heads, kv_heads = 16, 4, 2
    q = torch.randn(q_len, heads, dim)
    k, v = torch.randn(seq_len, kv_heads, dim), torch.randn(seq_len, kv_heads, dim)
    out = attend(q, k, v, k[-q_len:], v[-q_len:], 0.25, window)
    query_positions = torch.arange(seq_len - q_len, seq_len)[:, None]
    keys = torch.arange(seq_len)[None, :]
    mask = (keys <= query_positions) & (keys > query_positions - window)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1),
        v.repeat_interleave(2, 1).transpose(0, 1), attn_mask=mask, scale=0.25).transpose(0, 1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("q_len, seq_len, heads, kv_heads, window",
                         [(1, 1, 2, 2, None), (6, 6, 9, 3, None), (4, 50, 4, 1, None), (30, 30, 4, 2, 7),
                          (5, 64, 6, 3, 16)])
def test_flash_path_equals_dense_path(q_len, seq_len, heads, kv_heads, window):
    """attend's CPU flash-attention path (decoded keys strictly before each query, then the exact
    own position merged by the log-sum-exp) = the whole score matrix with the diagonal replaced;
    a query with nothing cached before it (position 0) reads only itself."""
    from vllm_seqkv.integration import backend

    if backend._FLASH_WITH_LSE is None:
        pytest.skip("this torch has no CPU flash attention with log-sum-exp")
    gen = torch.Generator().manual_seed(q_len + seq_len)
    dim = 32
    q = torch.randn(q_len, heads, dim, generator=gen) * 2
    k, v = torch.randn(seq_len, kv_heads, dim, generator=gen), torch.randn(seq_len, kv_heads, dim, generator=gen)
    own_k, own_v = torch.randn(q_len, kv_heads, dim, generator=gen), torch.randn(q_len, kv_heads, dim, generator=gen)
    flash = backend._attend_flash(q, k, v, own_k, own_v, dim**-0.5, window)
    dense = backend._attend_dense(q, k, v, own_k, own_v, dim**-0.5, window)
    torch.testing.assert_close(flash, dense, atol=1e-5, rtol=1e-5)
    if seq_len == q_len:
        torch.testing.assert_close(flash[0], own_v[0].repeat_interleave(heads // kv_heads, 0))
