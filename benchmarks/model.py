"""A small pure-torch fp32 forward for Llama / Qwen2 / Mistral-style HF checkpoints.

The ruler's own model, so that every layer's attention can read its cached past through a
KV codec exactly as a serving decode path would (see :func:`coded_attention`).

Supported: GQA, q/k/v biases when the checkpoint has them (Qwen2), tied embeddings,
``rope_theta`` with the default (unscaled) RoPE in HF's rotate-half layout, RMSNorm, SiLU
MLP. Not supported (clear error): other RoPE scalings, sliding windows shorter than the
context.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_seqkv.codec.rope import apply_rope, rope_tables  # noqa: F401  (re-exported)
import torch.nn.functional as F
from safetensors import safe_open


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    sliding_window: int | None
    name: str

    @classmethod
    def from_dir(cls, model_dir: Path) -> "ModelConfig":
        raw = json.loads((Path(model_dir) / "config.json").read_text())
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise NotImplementedError(f"{model_dir}: RoPE type {rope_type!r} is not supported by the ruler's forward")
        theta = raw.get("rope_theta", rope.get("rope_theta", 10000.0))
        heads = raw["num_attention_heads"]
        window = raw.get("sliding_window") if raw.get("use_sliding_window", True) else None
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads", heads),
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            sliding_window=window,
            name=Path(model_dir).name,
        )


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint's safetensors file(s), as fp32."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights")
    weights = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                weights[key] = handle.get_tensor(key).float()
    return weights


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@dataclass
class LayerKV:
    """One layer's K/V for a window: ``key_pre`` (pre-RoPE), ``key`` (post-RoPE, as cached),
    ``value``; each ``[T, H_kv, D]``."""

    key_pre: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor


class LlamaForward:
    """fp32 reference forward. ``logits(tokens)`` for one sequence starting at position 0."""

    def __init__(self, model_dir: Path):
        self.config = ModelConfig.from_dir(model_dir)
        self.w = load_weights(model_dir)
        prefix = "model." if "model.embed_tokens.weight" in self.w else ""
        self.prefix = prefix
        self.embed = self.w[f"{prefix}embed_tokens.weight"]
        self.lm_head = self.w.get("lm_head.weight", self.embed)

    def layer_weight(self, layer: int, name: str) -> torch.Tensor | None:
        return self.w.get(f"{self.prefix}layers.{layer}.{name}")

    def qkv(self, layer: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """``h [T, hidden]`` -> ``q [T, H, D]`` (post-RoPE) and :class:`LayerKV`."""
        cfg = self.config
        normed = rms_norm(h, self.layer_weight(layer, "input_layernorm.weight"), cfg.rms_norm_eps)
        proj = {}
        for name, heads in (("q", cfg.num_heads), ("k", cfg.num_kv_heads), ("v", cfg.num_kv_heads)):
            out = F.linear(normed, self.layer_weight(layer, f"self_attn.{name}_proj.weight"),
                           self.layer_weight(layer, f"self_attn.{name}_proj.bias"))
            proj[name] = out.view(h.shape[0], heads, cfg.head_dim)
        q = apply_rope(proj["q"], cos, sin)
        return q, LayerKV(key_pre=proj["k"], key=apply_rope(proj["k"], cos, sin), value=proj["v"])

    def finish_layer(self, layer: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual adds: ``h [T, hidden]``, ``attn [T, H, D]`` (pre o_proj) -> next hidden state."""
        h = h + F.linear(attn.reshape(h.shape[0], -1), self.layer_weight(layer, "self_attn.o_proj.weight"))
        normed = rms_norm(h, self.layer_weight(layer, "post_attention_layernorm.weight"), self.config.rms_norm_eps)
        gate = F.linear(normed, self.layer_weight(layer, "mlp.gate_proj.weight"))
        up = F.linear(normed, self.layer_weight(layer, "mlp.up_proj.weight"))
        return h + F.linear(F.silu(gate) * up, self.layer_weight(layer, "mlp.down_proj.weight"))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: ``[T, hidden] -> [T, vocab]``."""
        return F.linear(rms_norm(h, self.w[f"{self.prefix}norm.weight"], self.config.rms_norm_eps), self.lm_head)

    def check_context(self, length: int) -> None:
        window = self.config.sliding_window
        if window is not None and length > window:
            raise NotImplementedError(f"context {length} exceeds the model's sliding window {window}")
