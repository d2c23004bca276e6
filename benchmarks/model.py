"""The ruler's own fp32 forward of a decoder checkpoint, read the way vLLM's engine reads it.

The ruler needs its own forward so that every layer's attention can read its cached past
through a KV codec exactly as a serving decode path would (see :mod:`benchmarks.forward`).
So that the K/V it measures are the K/V the calibration captures and the engine serves, it
takes from vLLM whatever vLLM defines:

* the config through vLLM's own loader (:func:`compat.engine_text_config`: RoPE parameters
  standardized as the engine sees them);
* each layer's RoPE cos/sin table from vLLM's own ``get_rope`` for that layer's parameters
  (:func:`compat.rotary_from_parameters`, the same table reading as the served path's
  :func:`compat.layer_rotary`), applied with :func:`vllm_seqkv.codec.rope.table_rows`, the
  function the served path uses: every RoPE type vLLM applies by position (default, linear,
  llama3, YaRN incl. its mscale, dynamic NTK) works here without a copy of its formulas;
* the layer arithmetic of vLLM's model classes, listed per architecture in
  :data:`ARCHITECTURES` (what ``LlamaForCausalLM``, ``Qwen3ForCausalLM``,
  ``Gemma3ForCausalLM`` ... in ``vllm/model_executor/models`` compute): q/k/v biases when the
  checkpoint has them (Qwen2), per-head q/k RMS norm (Qwen3, Gemma 3), Gemma's ``(1 + w)``
  RMS norm, its embedding scale ``sqrt(hidden)``, its sandwich norms around attention and
  MLP, its ``query_pre_attn_scalar`` and final logit soft-cap, per-layer-type RoPE parameters
  and sliding windows, SiLU or tanh-GELU gated MLPs, tied embeddings.

Sliding-window layers (Mistral: every layer; Gemma 3: its ``sliding_attention`` layers) are
computed as vLLM computes them: ``config.layer_window[l]`` is the layer's ``sliding_window``
as vLLM's ``Attention`` receives it, and a query at position ``p`` attends to ``p - W < j <=
p`` (:mod:`benchmarks.attention`, the served path's read rule).

Refused with the feature named (:class:`NotImplementedError`): an architecture not in
:data:`ARCHITECTURES`, attention logit soft-capping; a context longer than the RoPE tables is
refused with a :class:`ValueError`. Partial rotary (``partial_rotary_factor``: vLLM's
``get_rope`` rotates the first ``rotary_dim`` channels) is computed as served: q and k in the
channel order of :func:`vllm_seqkv.codec.rope.channel_order`, under the full-width table.
``tests/bench/test_ruler_matches_vllm.py`` checks the per-layer K/V and the logits against
vLLM's engine on the fixtures of :mod:`seqkv_fixtures.architectures`, past the sliding
window of the windowed ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from vllm_seqkv.codec.rope import apply_rope, table_rows  # noqa: F401  (apply_rope re-exported)


@dataclass(frozen=True)
class Family:
    """What a vLLM model class computes beyond the Llama layer (per architecture name)."""

    gemma_norm: bool = False  # RMS norm weight applied as (1 + w)
    embed_scale: bool = False  # embeddings multiplied by sqrt(hidden), in the model dtype
    sandwich_norms: bool = False  # norm after attention and before/after the MLP (Gemma 2/3)
    query_scalar: bool = False  # attention scale query_pre_attn_scalar ** -0.5
    default_rope_theta: float | None = None  # set_default_rope_theta of the vLLM class


LLAMA = Family()
QWEN = Family(default_rope_theta=1e6)  # vLLM's Qwen2/Qwen3 decoder layers
GEMMA3 = Family(gemma_norm=True, embed_scale=True, sandwich_norms=True, query_scalar=True)
ARCHITECTURES = {
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": LLAMA,
    "Qwen2ForCausalLM": QWEN,  # q/k/v biases: read from the checkpoint
    "Qwen3ForCausalLM": QWEN,  # q/k norm: read from the checkpoint
    "Gemma3ForCausalLM": GEMMA3,
}
ACTIVATIONS = {  # vLLM's get_act_and_mul_fn names -> the gate's activation
    "silu": F.silu, "swish": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu, "geglu": F.gelu,
}


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
    architecture: str
    family: Family
    activation: str
    attn_scale: float  # softmax scale of q . k
    final_softcap: float | None
    layer_rope: tuple[dict, ...]  # vLLM's rope_parameters of each layer
    layer_window: tuple[int | None, ...]  # sliding window of each layer (None: full)
    max_position: int
    name: str

    @classmethod
    def from_dir(cls, model_dir: Path) -> "ModelConfig":
        from vllm_seqkv.integration import compat

        hf = compat.engine_text_config(model_dir)
        architecture = (getattr(hf, "architectures", None) or ["?"])[0]
        family = ARCHITECTURES.get(architecture)
        if family is None:
            raise NotImplementedError(f"{model_dir}: architecture {architecture} is not supported by the "
                                      f"ruler's forward (supported: {', '.join(ARCHITECTURES)})")
        if getattr(hf, "attn_logit_softcapping", None):
            raise NotImplementedError(f"{model_dir}: attention logit soft-capping is not supported by the "
                                      "ruler's forward")
        activation = getattr(hf, "hidden_activation", None) or getattr(hf, "hidden_act", "silu")
        if activation not in ACTIVATIONS:
            raise NotImplementedError(f"{model_dir}: MLP activation {activation!r} is not supported by the "
                                      "ruler's forward")
        if family.default_rope_theta is not None:
            compat.apply_default_rope_theta(hf, family.default_rope_theta)
        heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
        layers = hf.num_hidden_layers
        types = getattr(hf, "layer_types", None)
        rope = hf.rope_parameters or {}
        window = getattr(hf, "sliding_window", None)
        if types is not None:
            windows = tuple(window if t == "sliding_attention" else None for t in types)
        else:  # Mistral: the model's window on every layer (vLLM's cache config)
            windows = (window if getattr(hf, "use_sliding_window", True) else None,) * layers
        nested = types is not None and all(t in rope for t in set(types))
        layer_rope = tuple(dict(rope[t]) if nested else dict(rope) for t in (types or [None] * layers))
        scalar = getattr(hf, "query_pre_attn_scalar", None) if family.query_scalar else None
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            architecture=architecture,
            family=family,
            activation=activation,
            attn_scale=(scalar or head_dim) ** -0.5,
            final_softcap=getattr(hf, "final_logit_softcapping", None),
            layer_rope=layer_rope,
            layer_window=windows,
            max_position=getattr(hf, "max_position_embeddings", 8192),
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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMS norm over the last dim; ``offset`` 1 for Gemma's ``(1 + w)`` weights."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (offset + weight)


@dataclass
class LayerKV:
    """One layer's K/V for a window: ``key_pre`` (pre-RoPE, after any k norm: what vLLM's
    ``rotary_emb`` receives), ``key`` (post-RoPE, as cached), ``value``; each ``[T, H_kv, D]``."""

    key_pre: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor


class LlamaForward:
    """fp32 reference forward of a checkpoint in :data:`ARCHITECTURES` (the name is historical).
    Per layer: ``rope(layer, positions)``, ``qkv(layer, h, positions)``, ``finish_layer``; then
    ``logits``. ``embed(tokens)`` starts a sequence."""

    def __init__(self, model_dir: Path):
        from vllm_seqkv.integration import compat

        self.config = ModelConfig.from_dir(model_dir)
        cfg = self.config
        self.w = load_weights(model_dir)
        prefix = "model." if "model.embed_tokens.weight" in self.w else ""
        self.prefix = prefix
        self.embed_weight = self.w[f"{prefix}embed_tokens.weight"]
        self.lm_head = self.w.get("lm_head.weight", self.embed_weight)
        # vLLM's Gemma3Model: the normalizer is cast to the model dtype (float32 here)
        self.embed_scale = float(torch.tensor(math.sqrt(cfg.hidden_size), dtype=torch.float32)) \
            if cfg.family.embed_scale else 1.0
        self.norm_offset = 1.0 if cfg.family.gemma_norm else 0.0
        self._tables: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._layer_table: list[torch.Tensor] = []
        self._layer_order: list[torch.Tensor | None] = []
        for rope in cfg.layer_rope:
            key = repr(sorted(rope.items()))
            if key not in self._tables:
                rotary = compat.rotary_from_parameters(cfg.head_dim, cfg.max_position, rope or None)
                # partial / interleaved rotations: q and k reordered as the served path does
                self._tables[key] = (rotary.full_width_table(), rotary.channel_order())
            self._layer_table.append(self._tables[key][0])
            self._layer_order.append(self._tables[key][1])

    def layer_weight(self, layer: int, name: str) -> torch.Tensor | None:
        return self.w.get(f"{self.prefix}layers.{layer}.{name}")

    def norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, weight, self.config.rms_norm_eps, self.norm_offset)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [T]`` -> the first layer's input ``[T, hidden]`` (embedding row x scale)."""
        rows = self.embed_weight[tokens]
        return rows * self.embed_scale if self.embed_scale != 1.0 else rows

    def rope(self, layer: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin [T, D]`` of layer ``layer`` at ``positions [T]`` (vLLM's table rows)."""
        return table_rows(self._layer_table[layer], positions)

    def qkv(self, layer: int, h: torch.Tensor, positions: torch.Tensor):
        """``h [T, hidden]`` at ``positions [T]`` -> ``q [T, H, D]`` (post-RoPE, pre-scaled so that
        ``D ** -0.5`` is the model's softmax scale) and :class:`LayerKV`."""
        cfg = self.config
        normed = self.norm(h, self.layer_weight(layer, "input_layernorm.weight"))
        proj = {}
        for name, heads in (("q", cfg.num_heads), ("k", cfg.num_kv_heads), ("v", cfg.num_kv_heads)):
            out = self.linear(layer, f"self_attn.{name}_proj", normed)
            proj[name] = out.view(h.shape[0], heads, cfg.head_dim)
            norm = self.layer_weight(layer, f"self_attn.{name}_norm.weight")
            if norm is not None:  # per-head q/k RMS norm (Qwen3, Gemma 3)
                proj[name] = self.norm(proj[name], norm)
        order = self._layer_order[layer]
        if order is not None:  # the served path's channel order (vllm_seqkv.codec.rope)
            proj["q"], proj["k"] = proj["q"][..., order], proj["k"][..., order]
        cos, sin = self.rope(layer, positions)
        q = apply_rope(proj["q"], cos, sin)
        if cfg.attn_scale != cfg.head_dim ** -0.5:
            q = q * (cfg.attn_scale * cfg.head_dim ** 0.5)
        return q, LayerKV(key_pre=proj["k"], key=apply_rope(proj["k"], cos, sin), value=proj["v"])

    def finish_layer(self, layer: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual adds: ``h [T, hidden]``, ``attn [T, H, D]`` (pre o_proj) -> next hidden state."""
        out = self.linear(layer, "self_attn.o_proj", attn.reshape(h.shape[0], -1))
        if self.config.family.sandwich_norms:
            h = h + self.norm(out, self.layer_weight(layer, "post_attention_layernorm.weight"))
            mlp = self.mlp(layer, self.norm(h, self.layer_weight(layer, "pre_feedforward_layernorm.weight")))
            return h + self.norm(mlp, self.layer_weight(layer, "post_feedforward_layernorm.weight"))
        h = h + out
        return h + self.mlp(layer, self.norm(h, self.layer_weight(layer, "post_attention_layernorm.weight")))

    def linear(self, layer: int, name: str, x: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s linear ``name`` (``weight`` and, when the checkpoint has it, ``bias``)."""
        return F.linear(x, self.layer_weight(layer, f"{name}.weight"), self.layer_weight(layer, f"{name}.bias"))

    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.linear(layer, "mlp.gate_proj", x), self.linear(layer, "mlp.up_proj", x)
        return self.linear(layer, "mlp.down_proj", ACTIVATIONS[self.config.activation](gate) * up)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head (+ soft-cap): ``[T, hidden] -> [T, vocab]``."""
        logits = F.linear(self.norm(h, self.w[f"{self.prefix}norm.weight"]), self.lm_head)
        cap = self.config.final_softcap
        return torch.tanh(logits / cap) * cap if cap else logits

    def window(self, layer: int) -> int | None:
        """Layer ``layer``'s sliding window (a query at ``p`` attends to ``p - W < j <= p``), or
        None where the layer attends to the whole past."""
        return self.config.layer_window[layer]

    def check_context(self, length: int) -> None:
        """Refuse a context of ``length`` positions that the RoPE tables do not cover."""
        rows = min(table.shape[0] for table in self._layer_table)
        if length > rows:
            raise ValueError(f"context {length} exceeds the {rows} positions of {self.config.name}'s RoPE "
                             "tables (max_position_embeddings)")
