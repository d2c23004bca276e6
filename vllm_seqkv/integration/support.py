"""Which models seqkv can serve; everything else is refused up front, naming the feature."""

from __future__ import annotations

from vllm_seqkv.codec.hadamard import is_power_of_two


class UnsupportedModelError(ValueError):
    pass


def unsupported_features(model_config) -> list[str]:
    """Model features the seqkv backend cannot store compressed (empty = supported)."""
    checks = {
        "multi-head latent attention (MLA)": lambda: model_config.use_mla,
        "hybrid attention/state-space layers (Mamba/linear attention)":
            lambda: model_config.is_hybrid,
        "an attention-free architecture": lambda: model_config.is_attention_free,
        "an encoder-decoder architecture": lambda: model_config.is_encoder_decoder,
        "multimodal inputs": lambda: model_config.is_multimodal_model,
    }
    found = [name for name, present in checks.items() if present()]
    found += rope_refusals(model_config.hf_config)
    head_size = model_config.get_head_size()
    if not is_power_of_two(head_size):
        found.append(f"head size {head_size} (the rotation code needs a power of two)")
    return found


# RoPE types whose vLLM rotary embedding is one cos/sin table of positions (the rotation of a
# key depends on its position only): seqkv un-rotates and re-rotates keys with that table.
POSITION_ONLY_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")


def rope_parameter_sets(hf_config) -> list[dict]:
    """The RoPE parameter dicts of a transformers config: one, or one per layer type
    (Gemma-3: ``{"sliding_attention": {...}, "full_attention": {...}}``)."""
    rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    if rope and all(isinstance(v, dict) for v in rope.values()):
        return list(rope.values())
    return [rope]


def rope_refusals(hf_config) -> list[str]:
    """RoPE features seqkv cannot invert with a table of positions (empty = none)."""
    found = []
    for rope in rope_parameter_sets(hf_config):
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rope_type not in POSITION_ONLY_ROPE_TYPES:
            found.append(f"RoPE type {rope_type!r} (seqkv supports the position-only types "
                         f"{', '.join(POSITION_ONLY_ROPE_TYPES)})")
        if "mrope_section" in rope:
            found.append("multimodal RoPE (mrope sections)")
    return list(dict.fromkeys(found))


def rotary_refusals(rotary, head_size: int) -> list[str]:
    """Why seqkv cannot invert an attention layer's rotary embedding (empty = it can).
    ``rotary``: :class:`~vllm_seqkv.integration.compat.LayerRotary` or None (none found)."""
    if rotary is None:
        return ["no rotary embedding seqkv can find (it codes keys pre-RoPE: the model's "
                "attention modules must hold it as `rotary_emb`)"]
    if rotary.table.dim() != 2 or rotary.table.shape[1] != rotary.rotary_dim:
        return [f"a {rotary.kind} rotary embedding whose cos/sin cache is not one row per position"]
    try:  # partial and interleaved rotations are reordered to full-width neox (codec.rope)
        rotary.channel_order()
        rotary.full_width_table()
    except ValueError as exc:
        return [f"a {rotary.kind} rotary embedding seqkv cannot reorder to full width ({exc})"]
    if rotary.head_size != head_size:
        return [f"a {rotary.kind} rotary embedding of head size {rotary.head_size} on an "
                f"attention layer of head size {head_size}"]
    return []


def unsupported_engine_options(vllm_config) -> list[str]:
    """Engine options that change layer 0's K/V away from the token's: the presets store
    layer 0 as the token's row of a calibrated table, and the whole codec is calibrated on
    the base weights."""
    checks = {
        "prompt embeddings (--enable-prompt-embeds; layer 0 is stored as token ids)":
            lambda: vllm_config.model_config.enable_prompt_embeds,
        "LoRA adapters (--enable-lora; the codec is calibrated on the base weights)":
            lambda: vllm_config.lora_config is not None,
    }
    return [name for name, present in checks.items() if present()]


def check_model_supported(model_config, vllm_config=None) -> None:
    found = unsupported_features(model_config)
    if vllm_config is not None:
        found += unsupported_engine_options(vllm_config)
    if found:
        raise UnsupportedModelError(
            f"--kv-cache-backend seqkv does not support {model_config.model}: it uses "
            + "; ".join(found) + ". Serve it with --kv-cache-backend auto."
        )
