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
        "sliding-window attention": lambda: model_config.get_sliding_window() is not None,
        "multimodal inputs": lambda: model_config.is_multimodal_model,
    }
    found = [name for name, present in checks.items() if present()]
    hf_config = model_config.hf_config
    rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        found.append(f"RoPE type {rope_type!r} (keys are coded pre-RoPE with default RoPE)")
    if rope.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0)) != 1.0:
        found.append("partial rotary embeddings")
    head_size = model_config.get_head_size()
    if not is_power_of_two(head_size):
        found.append(f"head size {head_size} (the rotation code needs a power of two)")
    return found


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
