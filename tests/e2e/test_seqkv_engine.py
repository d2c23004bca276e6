"""Compressed KV pages inside a real vLLM engine (tiny trained model, CPU)."""

import math

import pytest
from transformers import AutoTokenizer

from tests.e2e.engines import engine, greedy, kv_tokens, prompt_logprobs

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def token_windows(tiny_model_dir, test_text):
    ids = AutoTokenizer.from_pretrained(tiny_model_dir)(test_text[:200_000])["input_ids"]
    return [ids[i * 300:(i + 1) * 300] for i in range(6)]


@pytest.fixture(scope="module")
def auto_run(tiny_model_dir, token_windows):
    with engine(tiny_model_dir, "auto") as llm:
        yield {"tokens": kv_tokens(llm),
               "logprobs": prompt_logprobs(llm, *token_windows[:3]),
               "greedy": greedy(llm, [w[:40] for w in token_windows])}


@pytest.fixture(scope="module")
def seqkv_llm(tiny_model_dir):
    with engine(tiny_model_dir, "seqkv") as llm:
        yield llm


def ppl(logprob_lists):
    flat = [x for lps in logprob_lists for x in lps]
    return math.exp(-sum(flat) / len(flat))


def test_capacity_grows_by_the_slot_ratio(seqkv_llm, auto_run, tiny_model_dir):
    """In the budget left after seqkv's fixed memory, the pages hold ``bf16 bytes / slot
    bytes`` times the tokens (see tests/e2e/test_fixed_memory.py for the fixed memory)."""
    from vllm_seqkv.calibrate import load_for_model
    from vllm_seqkv.codec import make_codec
    from vllm_seqkv.codec.base import SlotLayout
    from vllm_seqkv.config import SeqKVConfig
    from prometheus_client import REGISTRY

    preset = SeqKVConfig().preset
    codec = make_codec(preset, load_for_model(tiny_model_dir, preset))
    slot_bytes = max(SlotLayout(*codec.codecs_for_layer(layer), num_kv_heads=2, head_dim=32).slot_bytes
                     for layer in range(4))
    taken = REGISTRY.get_sample_value("seqkv_fixed_bytes_taken_from_kv_budget", {"preset": preset})
    budget = seqkv_llm.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes
    ratio = kv_tokens(seqkv_llm) / auto_run["tokens"] * budget / (budget - taken)
    assert ratio == pytest.approx(2 * 2 * 32 / slot_bytes, rel=0.01)
    assert ratio > 3.5  # seqkv-f4: 4.0


def test_perplexity_close_to_uncompressed(seqkv_llm, auto_run, token_windows):
    seqkv = ppl(prompt_logprobs(seqkv_llm, *token_windows[:3]))
    auto = ppl(auto_run["logprobs"])
    assert seqkv / auto - 1 < 0.10, (seqkv, auto)


def test_mixed_batch_equals_one_by_one(seqkv_llm, token_windows):
    prompts = [w[: 17 + 45 * i] for i, w in enumerate(token_windows)]
    batched = prompt_logprobs(seqkv_llm, *prompts)
    alone = [prompt_logprobs(seqkv_llm, p)[0] for p in prompts]
    for b, a in zip(batched, alone):
        assert max(abs(x - y) for x, y in zip(b, a)) < 0.05


def test_prefix_cache_hit_reads_the_compressed_blocks(seqkv_llm, tiny_model_dir, token_windows):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    shared = token_windows[4][:256]
    first = shared + token_windows[5][:20]
    second = shared + token_windows[5][20:40]
    params = SamplingParams(max_tokens=8, temperature=0)
    seqkv_llm.generate([TokensPrompt(prompt_token_ids=first)], params, use_tqdm=False)
    hit = seqkv_llm.generate([TokensPrompt(prompt_token_ids=second)], params, use_tqdm=False)[0]
    assert hit.num_cached_tokens >= 224
    with engine(tiny_model_dir, "seqkv", enable_prefix_caching=False) as cold:
        assert greedy(cold, [second], 8)[0] == list(hit.outputs[0].token_ids)


def test_chunked_prefill_matches_single_chunk(tiny_model_dir, seqkv_llm, token_windows):
    whole = prompt_logprobs(seqkv_llm, token_windows[2])[0]
    with engine(tiny_model_dir, "seqkv", max_num_batched_tokens=64,
                enable_prefix_caching=False) as chunked:
        pieces = prompt_logprobs(chunked, token_windows[2])[0]
    assert len(whole) == len(pieces)
    assert max(abs(a - b) for a, b in zip(whole, pieces)) < 0.05


def test_greedy_agreement_is_reported(seqkv_llm, auto_run, token_windows):
    outputs = greedy(seqkv_llm, [w[:40] for w in token_windows])
    first = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
             for x, y in zip(outputs, auto_run["greedy"])]
    assert sum(first) / (16 * len(first)) > 0.2
