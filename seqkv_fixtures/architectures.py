"""Small offline models of the architectures people serve, for plumbing and quality tests.

Each is a 4-layer model on the tiny test model's tokenizer (4k vocab; ``gemma3-262k`` has
Gemma-3's real 262,144 rows of embedding and logits on that tokenizer). Two kinds:

* the trained tiny Llama's weights under another config: RoPE variants (``llama3``, ``yarn``,
  ``linear``, ``dynamic``, ``partial``: half of each head rotated) and Mistral (a 64-token
  sliding window on every layer). The model
  still works (it was trained on 128-token windows), so perplexity deltas mean something.
* other attention layouts (Qwen2 QKV bias, Qwen3 q/k norm, MQA with head size 256, Gemma-3
  interleaved sliding/global layers, GLM-4 partial interleaved rotary), built from a
  transformers config with random weights, then trained for ``steps`` steps of the tiny
  model's recipe (0 = random weights: plumbing only).

``build(name)`` writes ``$SEQKV_HOME/models/arch-<name>`` once and returns it.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from seqkv_fixtures import home, tiny_model_dir

ROPE_VARIANTS = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 512, "rope_theta": 10000.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
             "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
}
SMALL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, max_position_embeddings=4096,
             tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


def _configs(vocab: int) -> dict:
    from transformers import Gemma3TextConfig, Glm4Config, LlamaConfig, Qwen2Config, Qwen3Config

    return {
        "qwen2": lambda: Qwen2Config(vocab_size=vocab, num_attention_heads=4, num_key_value_heads=2,
                                     rope_theta=10000.0, **SMALL),  # q/k/v projections with bias
        "qwen3": lambda: Qwen3Config(vocab_size=vocab, num_attention_heads=4, num_key_value_heads=2,
                                     head_dim=32, rope_theta=10000.0, **SMALL),  # q/k RMS norm
        "mqa256": lambda: LlamaConfig(vocab_size=vocab, num_attention_heads=2, num_key_value_heads=1,
                                      head_dim=256, rope_theta=10000.0, **SMALL),
        "glm4": lambda: Glm4Config(  # rotates half of each head, interleaved pairs; QKV bias
            vocab_size=vocab, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            partial_rotary_factor=0.5, rope_theta=10000.0, pad_token_id=0, **SMALL),
        "gemma3": lambda: Gemma3TextConfig(
            vocab_size=vocab, num_attention_heads=4, num_key_value_heads=1, head_dim=64,
            sliding_window=64, layer_types=["sliding_attention"] * 3 + ["full_attention"],
            query_pre_attn_scalar=64, **{k: v for k, v in SMALL.items() if k != "tie_word_embeddings"}),
        # Gemma-3's real vocabulary size (embedding and logits 262,144 rows); the tokenizer
        # stays the tiny model's, so prompts use its first 4k ids and outputs may be any id
        "gemma3-262k": lambda: Gemma3TextConfig(
            vocab_size=GEMMA3_VOCAB, num_attention_heads=4, num_key_value_heads=1, head_dim=64,
            sliding_window=64, layer_types=["sliding_attention"] * 3 + ["full_attention"],
            query_pre_attn_scalar=64, **{k: v for k, v in SMALL.items() if k != "tie_word_embeddings"}),
    }


GEMMA3_VOCAB = 262_144  # Gemma-3's vocabulary (Gemma-3-270M: 262,144 rows)
MISTRAL_WINDOW = 64
PARTIAL_ROTARY = 0.5  # rope-partial: the tiny Llama rotating 16 of its 32 channels per head
TRAINED = tuple(f"rope-{v}" for v in ROPE_VARIANTS) + ("rope-partial", "mistral")  # the tiny model's weights
ARCHITECTURES = TRAINED + ("qwen2", "qwen3", "mqa256", "gemma3", "gemma3-262k", "glm4")


def model_dir(name: str, steps: int = 0) -> Path:
    if name in TRAINED:
        return home() / "models" / f"arch-{name}"
    return home() / "models" / (f"arch-{name}-{steps}steps" if steps else f"arch-{name}-random")


def build(name: str, steps: int = 0) -> Path:
    """The model ``name`` (one of :data:`ARCHITECTURES`), built once; ``steps`` (not for the
    RoPE variants, which are the trained tiny model): training steps, 0 = random weights."""
    out = model_dir(name, steps)
    if (out / "config.json").exists():
        return out
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; one of {', '.join(ARCHITECTURES)}")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if name == "rope-partial":
        _partial_rotary(tmp)
    elif name.startswith("rope-"):
        _rope_variant(tmp, ROPE_VARIANTS[name[len("rope-"):]])
    elif name == "mistral":
        _mistral(tmp)
    else:
        _trained(tmp, name, steps)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def _rope_variant(out: Path, rope: dict) -> None:
    shutil.copytree(tiny_model_dir(), out)
    config = json.loads((out / "config.json").read_text())
    config.pop("rope_theta", None)
    config["rope_parameters"] = dict(rope)
    config["rope_scaling"] = dict(rope)
    (out / "config.json").write_text(json.dumps(config, indent=2))


def _partial_rotary(out: Path) -> None:
    """The tiny Llama rotating only the first half of each head's channels (as Phi-4-mini,
    GLM-4 and StableLM do; vLLM's ``get_rope`` reads ``partial_rotary_factor``). The weights
    were trained with full rotation: the model is perturbed but still a language model, and
    auto and seqkv run the same perturbed model."""
    shutil.copytree(tiny_model_dir(), out)
    config = json.loads((out / "config.json").read_text())
    config["partial_rotary_factor"] = PARTIAL_ROTARY
    (out / "config.json").write_text(json.dumps(config, indent=2))


def _mistral(out: Path) -> None:
    """The tiny Llama as a Mistral (same weight names) with a sliding window on every layer."""
    shutil.copytree(tiny_model_dir(), out)
    config = json.loads((out / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=MISTRAL_WINDOW)
    (out / "config.json").write_text(json.dumps(config, indent=2))


def _trained(out: Path, name: str, steps: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from seqkv_fixtures import corpus
    from seqkv_fixtures.tiny import SEED, _perplexity, train

    tok = AutoTokenizer.from_pretrained(tiny_model_dir())
    torch.manual_seed(SEED)
    config = _configs(len(tok))[name]()
    model = AutoModelForCausalLM.from_config(config)
    record = {"architecture": type(model).__name__, "steps": steps, "seed": SEED}
    if steps:
        text_dir = corpus.build()
        ids = torch.tensor(tok((text_dir / "train.txt").read_text()[:1_000_000])["input_ids"])
        test_ids = torch.tensor(tok((text_dir / "test.txt").read_text()[:100_000])["input_ids"])
        t0 = time.time()
        train(model, ids, steps)
        record.update(train_seconds=round(time.time() - t0, 1), test_ppl=_perplexity(model, test_ids))
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "training.json").write_text(json.dumps(record, indent=2))
