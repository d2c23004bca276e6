import pytest
import torch

from benchmarks.attention import attention, check_causal, read_starts
from vllm_seqkv.codec import make_codec
from vllm_seqkv.codec.base import KVCodec
from vllm_seqkv.codec.baselines import Bf16Codec, KiviKeyCodec, KiviValueCodec

LENGTH, HEADS, KV_HEADS, DIM = 70, 4, 2, 8


def brute_force(codec, q, k, v, ck, cv, window=None):
    """One token at a time, exactly as a decode step of the served path reads its cache: from
    the first position of its sliding window (``t - window + 1``), the sinks exact only when
    that window starts at position 0."""
    out = torch.empty_like(q)
    group = HEADS // KV_HEADS
    for t in range(LENGTH):
        start = codec.exact_window_start(t)
        first = 0 if window is None else max(0, t - window + 1)
        sinks = codec.sink_tokens if first == 0 else 0
        read = range(first, t + 1)
        coded = [sinks <= j < start and j < t for j in read]
        for h in range(HEADS):
            g = h // group
            keys = torch.stack([ck[j, g] if c else k[j, g] for j, c in zip(read, coded)])
            vals = torch.stack([cv[j, g] if c else v[j, g] for j, c in zip(read, coded)])
            out[t, h] = (keys @ q[t, h] / DIM**0.5).softmax(-1) @ vals
    return out


class Block16(Bf16Codec):
    block_size = 16


@pytest.mark.parametrize("windows", [{}, {"exact_recent": 9}, {"sink_tokens": 3, "exact_recent": 5},
                                     {"block_exact": True}, {"sink_tokens": 40},
                                     {"sink_tokens": 4, "block_exact": True}])
@pytest.mark.parametrize("sliding", [None, 20])  # 20: sliding-window layer, windows cross chunks
def test_vectorised_attention_equals_token_by_token_decode(windows, sliding, monkeypatch):
    import benchmarks.attention as attention_module

    monkeypatch.setattr(attention_module, "QUERY_CHUNK", 32)  # several chunks, a ragged last one
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(LENGTH, HEADS, DIM, generator=gen)
    k, v, ck, cv = (torch.randn(LENGTH, KV_HEADS, DIM, generator=gen) for _ in range(4))
    codec = KVCodec("probe", Block16(), Block16(), **windows)
    out, exact_tail = attention(q, k, v, ck, cv, read_starts(codec, LENGTH), codec.sink_tokens, exact_rows=20,
                                window=sliding)
    assert torch.allclose(out, brute_force(codec, q, k, v, ck, cv, sliding), atol=1e-5)
    assert torch.allclose(exact_tail, attention(q, k, v, window=sliding)[-20:], atol=1e-6)
    assert torch.allclose(exact_tail, brute_force(KVCodec("exact", Block16(), Block16()), q, k, v, k, v,
                                                  sliding)[-20:], atol=1e-5)


def test_block_codec_without_window_is_refused():
    no_window = KVCodec("kivi-no-window", KiviKeyCodec(2), KiviValueCodec(2))
    with pytest.raises(ValueError, match="partially filled"):
        check_causal(no_window, 128)
    check_causal(make_codec("kivi-2"), 128)
    check_causal(make_codec("fp8-e4m3"), 128)
