import pytest
import torch

from benchmarks.forward import run_window
from benchmarks.model import LlamaForward
from seqkv_fixtures import architectures
from vllm_seqkv.codec import make_codec


def test_forward_matches_transformers(tiny_model_dir):
    from transformers import LlamaForCausalLM

    tokens = torch.randint(0, 4096, (96,), generator=torch.Generator().manual_seed(0))
    hf = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = torch.log_softmax(hf(tokens[None]).logits[0], dim=-1)
    got = run_window(LlamaForward(tiny_model_dir), tokens).log_probs
    assert got.shape == expected.shape
    assert (got - expected).abs().max() < 1e-4


def test_coded_run_changes_only_what_the_codec_touches(tiny_model_dir):
    model = LlamaForward(tiny_model_dir)
    tokens = torch.randint(0, 4096, (64,), generator=torch.Generator().manual_seed(1))
    exact = run_window(model, tokens, collect_kv=True)
    # the first token reads only itself (exact), so its prediction cannot move
    coarse = run_window(model, tokens, make_codec("turbo-2"), measure_attention=True)
    assert torch.allclose(coarse.log_probs[0], exact.log_probs[0], atol=1e-5)
    assert (coarse.log_probs[1:] - exact.log_probs[1:]).abs().max() > 1e-3
    assert len(coarse.attn_err_sq) == model.config.num_layers
    assert all(e > 0 for e in coarse.attn_err_sq)
    assert len(exact.kv) == model.config.num_layers
    assert exact.kv[0].key.shape == (64, model.config.num_kv_heads, model.config.head_dim)


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "mqa256"])
def test_forward_matches_transformers_on_other_layouts(name):
    """QKV bias (Qwen2), q/k norm (Qwen3), one KV head of size 256: random-weight fixtures, same
    logits as transformers' own classes (vLLM's engine is the reference in
    test_ruler_matches_vllm.py; this one is cheap)."""
    from transformers import AutoModelForCausalLM

    model_dir = architectures.build(name)
    tokens = torch.randint(0, 4096, (80,), generator=torch.Generator().manual_seed(2))
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = torch.log_softmax(hf(tokens[None]).logits[0], dim=-1)
    got = run_window(LlamaForward(model_dir), tokens).log_probs
    assert (got - expected).abs().max() < 1e-4


def test_forward_refuses_what_it_cannot_compute(tiny_model_dir):
    model = LlamaForward(tiny_model_dir)
    rows = model.config.max_position
    with pytest.raises(ValueError, match=f"context {rows + 1} exceeds the {rows} positions"):
        run_window(model, torch.zeros(rows + 1, dtype=torch.long))
    with pytest.raises(NotImplementedError, match="Glm4ForCausalLM is not supported"):
        LlamaForward(architectures.build("glm4"))  # served (benchmarks/models.json), not ruled


def test_generation_past_a_sliding_window_follows_the_teacher_forced_run():
    """Mistral fixture (64-token window on every layer): a greedy answer generated through a
    codec, from a prompt inside the window to well past it, is the argmax of the
    teacher-forced run through the same codec (both apply the window, and its sink rule)."""
    from benchmarks.generate import generate

    model = LlamaForward(architectures.build("mistral"))
    assert set(model.config.layer_window) == {architectures.MISTRAL_WINDOW}
    prompt = torch.randint(0, 4096, (50,), generator=torch.Generator().manual_seed(3))
    codec = make_codec("kivi-2")
    tokens = generate(model, [prompt], codec, 90)[0]
    sequence = torch.cat([prompt, torch.tensor(tokens)])
    assert sequence.numel() > 2 * architectures.MISTRAL_WINDOW
    log_probs = run_window(model, sequence[:-1], codec).log_probs[prompt.numel() - 1:]
    assert log_probs.argmax(-1).tolist() == tokens


def test_config_without_a_rope_base_gets_the_vllm_classs_default(monkeypatch):
    """vLLM's Qwen2/Qwen3 decoder layers set rope_theta 1e6 when a config has none (Llama's
    get_rope falls back to 10000): the ruler reads the config as those classes do."""
    from benchmarks.model import ModelConfig
    from vllm_seqkv.integration import compat

    model_dir = architectures.build("qwen3")
    loaded = compat.engine_text_config

    def without_base(path):
        hf = loaded(path)
        hf.rope_parameters = {"rope_type": "default"}
        return hf

    monkeypatch.setattr(compat, "engine_text_config", without_base)
    assert ModelConfig.from_dir(model_dir).layer_rope[0]["rope_theta"] == 1e6
    assert "rope_theta" not in ModelConfig.from_dir(architectures.build("mistral")).layer_rope[0]
