"""RoPE variants as data: tables read from vLLM's own rotary embeddings (default, linear,
llama3, YaRN, dynamic NTK) invert exactly in :mod:`vllm_seqkv.codec.rope`, reproduce what vLLM
applies, and drive the C++ fused decode (pure rotations, YaRN's magnitude folded into the
query as the engine does) to the reference's result."""

import os

import pytest
import torch

from tests.kernels.cpu_helpers import random_layout, random_paged_case
from vllm_seqkv.codec.rope import (
    channel_order,
    full_width_table,
    inverse_order,
    rotate_by_table,
    split_table,
    unrotate_by_table,
)
from vllm_seqkv.kernels.reference import transform_decode_attention_reference
from vllm_seqkv.kernels.params import transform_layer_params

ORIGINAL = 64
VARIANTS = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIGINAL},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
}


def vllm_rotary(variant: str, head_size: int, max_position: int = 256, is_neox: bool = True,
                partial_rotary_factor: float = 1.0):
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    params = dict(VARIANTS[variant], rope_theta=10000.0, partial_rotary_factor=partial_rotary_factor)
    with set_current_vllm_config(VllmConfig()):
        return get_rope(head_size, max_position, is_neox, params, dtype=torch.float32)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_table_rotation_is_vllms_and_inverts(variant):
    rotary = vllm_rotary(variant, 64)
    table = rotary.cos_sin_cache.float()
    gen = torch.Generator().manual_seed(3)
    positions = torch.randint(0, table.shape[0], (40,), generator=gen)
    key = torch.randn(40, 2, 64, generator=gen)
    _, by_vllm = rotary.forward_native(positions, key.clone().view(40, -1), key.clone().view(40, -1))
    torch.testing.assert_close(rotate_by_table(key, table, positions), by_vllm.view(40, 2, 64),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unrotate_by_table(by_vllm.view(40, 2, 64), table, positions), key,
                               atol=1e-5, rtol=1e-5)
    rotation, magnitude = split_table(table)
    assert (magnitude > 1.05) == (variant == "yarn")  # YaRN bakes its mscale into cos/sin
    torch.testing.assert_close(rotation * magnitude, table, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head_size, factor, is_neox", [
    (64, 0.5, True),  # Phi-4-mini / StableLM style: the first half rotated, rotate-half pairs
    (64, 0.5, False),  # GLM-4: the first half rotated, interleaved pairs
    (64, 1.0, False),  # GPT-J style: every channel, interleaved pairs
    (128, 0.75, True),  # Phi-4-mini's factor
    (32, 0.25, False),
])
def test_partial_and_interleaved_rotations_reorder_to_full_width_neox(head_size, factor, is_neox):
    """What vLLM's own rotary embedding applies = the full-width table over the reordered
    channels; q.k of vLLM's rotated pair = q.k of the reordered pair; the inverse order and
    the table's inverse undo it."""
    rotary = vllm_rotary("default", head_size, is_neox=is_neox, partial_rotary_factor=factor)
    assert rotary.rotary_dim == int(head_size * factor)
    order = channel_order(rotary.rotary_dim, head_size, is_neox)
    assert sorted(order.tolist()) == list(range(head_size))
    table = full_width_table(rotary.cos_sin_cache.float(), head_size)
    assert table.shape == (rotary.cos_sin_cache.shape[0], head_size)
    gen = torch.Generator().manual_seed(11)
    positions = torch.randint(0, table.shape[0], (30,), generator=gen)
    query, key = torch.randn(2, 30, 2, head_size, generator=gen)
    by_vllm_q, by_vllm_k = (t.view(30, 2, head_size) for t in rotary.forward_native(
        positions, query.clone().view(30, -1), key.clone().view(30, -1)))
    reordered = rotate_by_table(key[..., order], table, positions)
    torch.testing.assert_close(reordered, by_vllm_k[..., order], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reordered[..., inverse_order(order)], by_vllm_k, atol=1e-5, rtol=1e-5)
    scores = (rotate_by_table(query[..., order], table, positions) * reordered).sum(-1)
    torch.testing.assert_close(scores, (by_vllm_q * by_vllm_k).sum(-1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(unrotate_by_table(by_vllm_k[..., order], table, positions), key[..., order],
                               atol=1e-5, rtol=1e-5)
    rotation, magnitude = split_table(table)
    assert magnitude == pytest.approx(1.0)


def test_full_width_neox_needs_no_reordering_and_bad_shapes_are_refused():
    assert channel_order(64, 64, True) is None
    with pytest.raises(ValueError, match="must be even"):
        channel_order(15, 64, True)
    with pytest.raises(ValueError, match="must be even"):
        channel_order(96, 64, True)


def test_scaled_table_on_a_partial_rotation_is_refused():
    """YaRN's mscale scales the rotated channels only: no single magnitude for the kernels."""
    rotary = vllm_rotary("yarn", 64, partial_rotary_factor=0.5)
    with pytest.raises(ValueError, match="partial rotary"):
        full_width_table(rotary.cos_sin_cache.float(), 64)


def test_table_past_its_positions_is_refused():
    table = vllm_rotary("default", 32, max_position=16).cos_sin_cache.float()
    with pytest.raises(ValueError, match="16 positions"):
        rotate_by_table(torch.zeros(1, 1, 32), table, torch.tensor([16]))


def test_rows_of_different_magnitudes_are_not_a_scaled_rotation():
    table = vllm_rotary("default", 32).cos_sin_cache.float().clone()
    table[3] *= 2
    with pytest.raises(ValueError, match="not a scaled rotation"):
        split_table(table)


@pytest.mark.skipif(os.environ.get("SEQKV_NO_CPU_EXT") == "1", reason="SEQKV_NO_CPU_EXT=1")
@pytest.mark.parametrize("variant", ["llama3", "yarn"])
def test_cpu_fused_decode_with_a_variant_table_matches_reference(variant):
    """The engine's kernel call: the table split into rotations, the magnitude in the query
    (and out of the exact own key), against the reference reading the table as is."""
    from vllm_seqkv.kernels import cpu_ops

    assert cpu_ops.load_cpu_ops(), cpu_ops.load_error()
    heads, dim, block_size, lens = 2, 64, 32, [5, 70, 130]
    layout = random_layout(heads, dim, pair_keys=True, seed=9)
    params = transform_layer_params(layout)
    pages, block_table, seq_lens = random_paged_case(layout, lens, block_size, seed=4)
    gen = torch.Generator().manual_seed(5)
    query = torch.randn(len(lens), heads * 2, dim, generator=gen)
    own_k, own_v = torch.randn(2, len(lens), heads, dim, generator=gen)
    table = vllm_rotary(variant, dim, max_position=160).cos_sin_cache.float().contiguous()
    rotation, magnitude = split_table(table)
    ref, ref_lse = transform_decode_attention_reference(query, own_k, own_v, pages, block_table, seq_lens,
                                                        layout, 0.125, rope=table, return_lse=True)
    out, lse = cpu_ops.transform_decode_attention_cpp(query * magnitude, own_k / magnitude, own_v, pages,
                                                      block_table, seq_lens, params, 0.125, rope=rotation,
                                                      return_lse=True)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)
