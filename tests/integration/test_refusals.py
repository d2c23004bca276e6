"""Models the seqkv backend cannot store are refused before any engine starts, by feature."""

import json
import shutil

import pytest

from vllm_seqkv.integration.support import UnsupportedModelError


def variant(tiny_model_dir, tmp_path, **overrides):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(overrides)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def engine_config(model_dir, backend="seqkv", **engine_args):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_seqkv.integration.plugin import register

    register()
    args = EngineArgs(model=str(model_dir), max_model_len=256, kv_cache_memory_bytes=32 << 20,
                      additional_config={"kv_cache_backend": backend}, **engine_args)
    return args.create_engine_config()


@pytest.mark.parametrize("overrides, feature", [
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 16,
                          "long_factor": [2.0] * 16, "original_max_position_embeddings": 1024}},
     "RoPE type 'longrope'"),
    ({"head_dim": 48, "hidden_size": 192}, "head size 48"),
])
def test_unsupported_model_is_refused_naming_the_feature(tiny_model_dir, tmp_path, overrides,
                                                         feature):
    model = variant(tiny_model_dir, tmp_path, **overrides)
    with pytest.raises(UnsupportedModelError, match=feature) as err:
        engine_config(model)
    assert "--kv-cache-backend auto" in str(err.value)
    engine_config(model, backend="auto")  # the stock cache still takes it


def test_supported_model_passes(tiny_model_dir, tmp_path):
    assert engine_config(tiny_model_dir).additional_config["kv_cache_backend"] == "seqkv"
    partial = variant(tiny_model_dir, tmp_path, partial_rotary_factor=0.5)  # reordered, not refused
    assert engine_config(partial).additional_config["kv_cache_backend"] == "seqkv"


@pytest.mark.parametrize("option, feature", [("enable_prompt_embeds", "prompt embeddings"),
                                             ("enable_lora", "LoRA adapters")])
def test_options_that_change_layer_0_are_refused(tiny_model_dir, option, feature):
    with pytest.raises(UnsupportedModelError, match=feature):
        engine_config(tiny_model_dir, **{option: True})
    engine_config(tiny_model_dir, backend="auto", **{option: True})


def test_a_layer_rotation_seqkv_cannot_invert_is_named():
    """Checked when a layer first runs, on the rotary embedding vLLM built for it."""
    import torch

    from vllm_seqkv.integration.compat import LayerRotary
    from vllm_seqkv.integration.support import rotary_refusals

    angles = torch.rand(8, 16)
    table = torch.cat([angles.cos(), angles.sin()], -1)
    assert rotary_refusals(LayerRotary(table, 32, 32, True, "RotaryEmbedding"), 32) == []
    # interleaved pairs and partial rotation are reordered to full-width neox
    assert rotary_refusals(LayerRotary(table, 32, 32, False, "RotaryEmbedding"), 32) == []
    half = torch.cat([angles[:, :8].cos(), angles[:, :8].sin()], -1)
    assert rotary_refusals(LayerRotary(half, 16, 32, True, "R"), 32) == []
    assert "different magnitudes" in rotary_refusals(LayerRotary(half * 1.2, 16, 32, True, "YaRN"), 32)[0]
    assert "not one row per position" in rotary_refusals(LayerRotary(table, 16, 32, True, "R"), 32)[0]
    assert "must be even" in rotary_refusals(LayerRotary(table[:, :15], 15, 32, True, "R"), 32)[0]
    assert "head size 64" in rotary_refusals(LayerRotary(table, 32, 64, True, "R"), 32)[0]
    assert "no rotary embedding" in rotary_refusals(None, 32)[0]


def test_rope_parameters_per_layer_type_are_each_checked():
    from types import SimpleNamespace

    from vllm_seqkv.integration.support import rope_refusals

    gemma3 = SimpleNamespace(rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}})
    assert rope_refusals(gemma3) == []
    gemma3.rope_parameters["full_attention"]["rope_type"] = "longrope"
    assert rope_refusals(gemma3) == ["RoPE type 'longrope' (seqkv supports the position-only types "
                                     "default, linear, llama3, yarn, dynamic)"]
