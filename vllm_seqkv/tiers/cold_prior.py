"""The cold tier's code-level coder prior, fitted on real hot codes of a model.

``model_blocks(model_dir, ids, block_size, kv)`` runs transformers (fp32, CPU) over ``ids``,
takes the post-RoPE K/V of every layer from the cache, codes them with the hot codec ``kv``
through :class:`~vllm_seqkv.codec.base.SlotLayout` and returns one ``bytes`` per block of
``block_size`` tokens laid out ``[layer, token, head, slot_bytes]`` (what a connector would
hand to ``save``), plus the columns (``heads * slot_bytes``) and the K+V elements per block.
The codec is passed in (``calibrate.codec_for_model``), so this module never imports the
calibration that builds on it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def model_blocks(model_dir: Path, ids: list[int], block_size: int, kv) -> tuple[list[bytes], int, int]:
    from transformers import AutoModelForCausalLM

    from vllm_seqkv.codec.base import SlotLayout
    from vllm_seqkv.codec.rope import rope_tables, rope_theta, unapply_rope

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    n = len(ids) // block_size * block_size
    with torch.inference_mode():
        # NOTE: a cache without the model's config keeps every position (a sliding-window
        # model's own cache keeps only its window)
        from transformers import DynamicCache

        cache = model(input_ids=torch.tensor([ids[:n]]), use_cache=True,
                      past_key_values=DynamicCache()).past_key_values
    per_layer, previous = [], None
    theta = rope_theta(model.config) or 10000.0
    for layer, lc in enumerate(cache.layers):
        k = lc.keys[0].transpose(0, 1).contiguous()  # [T, H, D]
        v = lc.values[0].transpose(0, 1).contiguous()
        if kv.pre_rope_keys:
            k = unapply_rope(k, *rope_tables(torch.arange(n), k.shape[-1], theta))
        kc, vc = kv.codecs_for_layer(layer)
        lay = SlotLayout(kc, vc, k.shape[1], k.shape[2])
        slots = lay.encode(k, v, previous)
        previous = lay.decode(slots, previous) if kv.cross_layer else None
        per_layer.append(slots.numpy())
    width = max(p.shape[-1] for p in per_layer)  # pages are uniform: smaller slots padded
    slots = np.stack([np.pad(p, ((0, 0), (0, 0), (0, width - p.shape[-1]))) for p in per_layer])  # [L, T, H, S]
    L, _, H, S = slots.shape
    D = cache.layers[0].keys.shape[-1]
    blocks = [np.ascontiguousarray(slots[:, i:i + block_size]).tobytes()
              for i in range(0, n, block_size)]
    return blocks, H * S, L * block_size * H * D * 2


def code_model_for(model_dir: Path, train_blocks: list[bytes] | None, kv):
    """The code-level cold coder of ``kv``'s slots for ``model_dir``, fitted on
    ``train_blocks`` (records of :func:`model_blocks`); None: the structural one (no prior)."""
    from transformers import AutoConfig

    from vllm_seqkv.tiers.code_model import CodeModelCodec

    cfg = AutoConfig.from_pretrained(model_dir)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return CodeModelCodec.for_kv_codec(kv, cfg.num_hidden_layers, cfg.num_key_value_heads,
                                       head_dim, samples=train_blocks)


def fit_cold_prior(model_dir: Path, kv, text: str, tokens: int = 4096):
    """:func:`code_model_for` fitted on the first ``tokens`` tokens of ``text`` (the
    calibration text, never an evaluation text)."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(text[:40 * tokens])["input_ids"][:tokens]
    blocks, _, _ = model_blocks(model_dir, ids, 128, kv)
    return code_model_for(model_dir, blocks, kv)
