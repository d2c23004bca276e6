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
