"""The architectures people serve, each a small offline model (seqkv_fixtures/
architectures.py) served through the real CPU vLLM engine with the default preset.

Per architecture, one seqkv engine: it starts (no refusal), vLLM's own block count gives the
preset's capacity over a bf16 cache, it generates, and the keys vLLM hands the cache,
un-rotated with the layer's own RoPE table, equal the pre-RoPE keys the calibration captures
from the same tokens (so what is calibrated is what is served: RoPE variant, partial and
interleaved rotation, QKV bias, q/k norm, one KV head, head size 256, sliding-window layers in
their own KV-cache group). The
prompt is longer than the sliding windows, so windowed layers read from the window's start.
Greedy agreement and perplexity against ``auto`` are benchmarks/models.py's (two engines per
architecture).
"""

import os

import pytest
import torch

import seqkv_fixtures as fixtures
from vllm_seqkv import calibrate
from seqkv_fixtures import architectures

pytestmark = pytest.mark.e2e
# default: YaRN (a table with a magnitude), Gemma-3 (q/k norm, one KV head, per-layer RoPE,
# sliding and global layers in two KV-cache groups; also with Gemma-3's 262k vocabulary),
# GLM-4 (half of each head rotated, interleaved pairs: channels reordered) and the trained tiny
# Llama rotating half of each head (the reordering checked on a trained model); the rest with
# SEQKV_ALL_ARCHITECTURES=1 (~2 min each on 2 cores)
EVERY = pytest.mark.skipif(os.environ.get("SEQKV_ALL_ARCHITECTURES") != "1",
                           reason="set SEQKV_ALL_ARCHITECTURES=1 (benchmarks/models.py measures them all)")
SERVED = ["rope-yarn", "gemma3", "gemma3-262k", "glm4", "rope-partial"] + [pytest.param(name, marks=EVERY) for name in (
    "rope-llama3", "qwen2", "qwen3", "mqa256", "mistral")]
PROMPT_TOKENS = 512  # past llama3's original 512 positions: the scaled frequencies matter
KV_BYTES = 32 << 20


def install_key_probe(worker):
    """In the worker: record, per layer, the keys vLLM hands the cache in the code frame."""
    from vllm_seqkv.integration import backend

    store: dict[int, list] = {}
    original = backend.SeqKVAttentionImpl._write_new_tokens

    def probe(self, index, metadata, key, value, pages):  # key: in code order, rotated as the model does
        _, positions = backend._new_token_slots(metadata, key)
        frame = self.engine.to_code_frame(key[:positions.shape[0]].float(), positions, index)
        store.setdefault(index, []).append((positions.cpu(), frame.cpu()))
        return original(self, index, metadata, key, value, pages)

    backend.SeqKVAttentionImpl._write_new_tokens = probe
    worker._seqkv_key_probe = store


def read_key_probe(worker):
    """``{layer: keys [P, H, D]}`` for positions 0 .. P - 1 (first write of each position)."""
    out = {}
    for layer, calls in worker._seqkv_key_probe.items():
        positions = torch.cat([p for p, _ in calls])
        keys = torch.cat([k for _, k in calls])
        first = {}
        for row, pos in enumerate(positions.tolist()):
            first.setdefault(pos, row)
        out[layer] = keys[[first[p] for p in range(len(first))]]
    return out


def bf16_token_count(model_dir, kv_bytes: int, block_size: int) -> int:
    """Tokens a bf16 cache holds in ``kv_bytes`` (vLLM's formula: K and V per layer, whole blocks)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_block = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 2 * block_size
    return kv_bytes // per_block * block_size


@pytest.mark.parametrize("name", SERVED)
def test_architecture_is_served_with_calibrated_keys(name, tmp_path, monkeypatch):
    from prometheus_client import REGISTRY

    from tests.e2e.engines import engine, greedy, kv_tokens

    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc(fn)
    model = architectures.build(name)
    text = fixtures.corpus_path("train").read_text()
    captured = calibrate.capture(model, text, tokens=calibrate.MIN_TOKENS)
    path = tmp_path / "calibration.safetensors"
    calibrate.calibrate(model, text, "seqkv-f4", calibrate.MIN_TOKENS, captured).save(path)
    ids = captured.token_ids[:PROMPT_TOKENS].tolist()
    with engine(model, "seqkv", {"preset": "seqkv-f4", "calibration": str(path)},
                max_model_len=1024, kv_cache_memory_bytes=KV_BYTES) as llm:
        tokens = kv_tokens(llm)
        block_size = llm.llm_engine.vllm_config.cache_config.block_size
        taken = int(REGISTRY.get_sample_value("seqkv_fixed_bytes_taken_from_kv_budget",
                                              {"preset": "seqkv-f4"}))
        llm.collective_rpc(install_key_probe)
        generated = greedy(llm, [ids], max_tokens=8)[0]
        served = llm.collective_rpc(read_key_probe)[0]
    assert len(generated) == 8
    # seqkv-f4: 4 bits/element in what the budget leaves after seqkv's fixed memory
    assert tokens / bf16_token_count(model, KV_BYTES - taken, block_size) >= 3.9
    assert sorted(served) == list(range(len(captured.keys)))
    errors = [float((served[layer][:PROMPT_TOKENS] - keys[:PROMPT_TOKENS]).norm() / keys[:PROMPT_TOKENS].norm())
              for layer, keys in enumerate(captured.keys)]
    # layer 0's keys depend on the tokens only: bf16 vs the calibration's fp32 forward. Above
    # it, the layers below attended over coded K/V (most on random Gemma-3, whose
    # post-attention norms scale the attention output up). A wrong RoPE table (variant,
    # magnitude, theta of a sliding vs global layer) or a missing sliding window moves these
    # keys by about their own norm at positions past the window. On the trained fixtures the
    # layers above stay within 0.025 (2026-12-05: yarn, llama3, mistral, partial); a query left
    # in the model's channel order while the keys are reordered (partial rotary) gave 0.20.
    bound = 0.08 if name in architectures.TRAINED else 0.3
    assert errors[0] < 0.02 and max(errors) < bound, f"vLLM's keys un-rotated vs the calibration's: {errors}"
