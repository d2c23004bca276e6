"""seqkv's fixed memory: what it measures, and how many blocks a KV budget leaves the pages."""

import random

import pytest
import torch
from transformers import AutoConfig

from tests.e2e.engines import seqkv_fixed_memory
from vllm_seqkv import kernels
from vllm_seqkv.integration.fixed_memory import FixedMemory


def brute_force_blocks(fixed, budget, per_block, whole, host):
    n = 0
    while (n + 1) * per_block + fixed.taken(n + 1, whole, host) <= budget:
        n += 1
    return n if per_block * n + fixed.taken(n, whole, host) <= budget else 0


@pytest.mark.parametrize("seed", range(40))
def test_blocks_within_is_the_largest_count_that_fits(seed):
    rng = random.Random(seed)
    fixed = FixedMemory(token_table=rng.choice([0, rng.randrange(1 << 20)]),
                        calibration=rng.randrange(1 << 18), kernel_params=rng.randrange(1 << 16),
                        kernel_params_on_device=rng.randrange(1 << 18), rope_tables=rng.randrange(1 << 18),
                        sink_table_bytes=rng.choice([0, rng.randrange(1 << 20), 64 << 20]),
                        sink_entry_bytes=rng.randrange(1, 4096),
                        sink_entries_by_token=rng.choice([None, rng.randrange(1, 5000)]),
                        scratch=rng.randrange(1 << 20))
    per_block = rng.randrange(1024, 65536)
    budget = rng.randrange(1 << 22)
    for whole in (True, False):
        for host in (True, False):
            blocks = fixed.blocks_within(budget, per_block, whole, host)
            assert blocks == brute_force_blocks(fixed, budget, per_block, whole, host)
            if blocks:
                assert fixed.budget_for(blocks, per_block, whole, host) <= budget
                assert fixed.blocks_within(fixed.budget_for(blocks, per_block, whole, host), per_block,
                                           whole, host) == blocks


def test_profiled_budget_gives_up_only_the_sink_table():
    fixed = FixedMemory(token_table=100, calibration=200, kernel_params=30, kernel_params_on_device=50,
                        rope_tables=7, sink_table_bytes=1000, sink_entry_bytes=10,
                        sink_entries_by_token=None, scratch=5000)
    assert fixed.taken(20, whole_budget=False, kv_on_host=True) == 200  # 20 blocks x 10
    assert fixed.taken(500, whole_budget=False, kv_on_host=True) == 1000  # sink_table_bytes binds
    assert fixed.taken(20, whole_budget=True, kv_on_host=True) == 100 + 200 + 30 + 7 + 200
    assert fixed.taken(20, whole_budget=True, kv_on_host=False) == 50 + 7 + 200  # host parts stay out
    assert "scratch" not in fixed.taken_parts(True, True)


def test_token_table_preset_counts_the_tables_their_search_copies_and_a_sink_row_per_token(tiny_model_dir):
    config = AutoConfig.from_pretrained(tiny_model_dir)
    vocab, layers, heads = config.vocab_size, config.num_hidden_layers, config.num_key_value_heads
    dim = config.hidden_size // config.num_attention_heads
    fixed, _ = seqkv_fixed_memory(tiny_model_dir, {"preset": "seqkv-3"}, max_model_len=512)
    bf16_tables = 2 * vocab * heads * dim * 2  # K and V [vocab, H, D]
    search = 2 * vocab * (dim + 1) * 4  # float32 copies of head 0 and their squared norms
    assert fixed.token_table == bf16_tables + search
    assert fixed.sink_entries_by_token == vocab
    entry = layers * heads * dim * 2 * 2  # bf16 K and V rows of one sequence start, every layer
    assert fixed.sink_table(10**6) == min(64 << 20, vocab * entry)
    assert fixed.sink_table(100) == 100 * entry  # one distinct first token per block at most
    assert fixed.rope_tables == 2 * 512 * dim * 4  # one table and its rotation, shared by every layer
    assert fixed.calibration > 0 and fixed.kernel_params >= 0


def test_per_layer_preset_has_no_token_table_and_a_sink_entry_per_block(tiny_model_dir):
    config = AutoConfig.from_pretrained(tiny_model_dir)
    layers, heads = config.num_hidden_layers, config.num_key_value_heads
    dim = config.hidden_size // config.num_attention_heads
    fixed, _ = seqkv_fixed_memory(tiny_model_dir, {"preset": "seqkv-f4", "sink_table_bytes": 1 << 20})
    assert fixed.token_table == 0 and fixed.sink_entries_by_token is None
    assert fixed.sink_table(100) == 100 * layers * heads * dim * 2 * 2  # bf16 K and V rows
    assert fixed.sink_table(10**6) == 1 << 20
    # the fused kernels' params view the codec's tables: only each stream's two placeholder
    # predictor scalars (no cross-layer predictor) are their own; the C++ CPU ops keep the key
    # pair blocks and their layer tables per layer (csrc/cpu/transform_cpu_ops.cpp's layout:
    # header, 6 int32 and 16 float entries per component and stream, RoPE tile rotations of
    # the 16 in-tile offsets, pair blocks composed with them, the key basis' pair blocks)
    placeholders = layers * 2 * (4 + 4)
    if kernels.implementation(torch.device("cpu")) == "cpp":
        half, tile = dim // 2, 16
        table_entries = 64 + 2 * 22 * heads * dim + 2 * half * tile + heads * half * 6 * tile + heads * 4 * half
        pair_blocks = 4 * heads * half
        assert fixed.kernel_params == placeholders + layers * 4 * (table_entries + pair_blocks)
    else:
        assert fixed.kernel_params == placeholders
    assert fixed.kernel_params_on_device > fixed.calibration // 2  # a GPU holds its own copies
    without_cpu_ops = seqkv_fixed_memory(tiny_model_dir, {"preset": "seqkv-f4", "sink_table_bytes": 1 << 20},
                                         pages_on_cpu=False)[0]
    assert without_cpu_ops.kernel_params == placeholders


def rope_storage_bytes(engine) -> int:
    """Bytes of the distinct storages behind every layer's RoPE tables (CPU copies)."""
    storages = {}
    for rope in engine._layer_rope.values():
        for tensor in (rope.table, rope.table_on("cpu"), rope.rotation_on("cpu")):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storages.values())


def test_layers_with_equal_rope_tables_share_one_copy_counted_once(tiny_model_dir):
    from vllm_seqkv.codec.rope import default_table
    from vllm_seqkv.integration.fixed_memory import fixed_memory_of

    config = AutoConfig.from_pretrained(tiny_model_dir)
    layers, dim, positions = config.num_hidden_layers, config.hidden_size // config.num_attention_heads, 384
    fixed, _ = seqkv_fixed_memory(tiny_model_dir, {"preset": "seqkv-f4"}, max_model_len=positions)
    engine = fixed_engine(tiny_model_dir)
    cache = default_table(4 * positions, dim, 10000.0)  # a rotary embedding's longer cos/sin cache
    for layer in range(layers):  # as the backend hands each layer its rows
        engine.set_rope_table(layer, default_table(4 * positions, dim, 10000.0)[:positions])
    assert len(engine.rope_tables()) == 1
    assert rope_storage_bytes(engine) == fixed.rope_tables == 2 * positions * dim * 4
    for layer in range(layers):
        assert torch.equal(engine.rope_of(layer, positions).table, cache[:positions])
    # Gemma-3 style: local and global layers with two bases -> two tables, each shared
    local = default_table(positions, dim, 10000.0)
    for layer in range(layers):
        engine.set_rope_table(layer, local if layer % 2 else default_table(positions, dim, 1e6))
    assert len(engine.rope_tables()) == 2
    assert rope_storage_bytes(engine) == fixed_memory_of(engine, layers, positions, rope_tables=2).rope_tables
    assert torch.equal(engine.rope_of(1, positions).table, local)


def fixed_engine(model_dir, options=None):
    from vllm_seqkv.config import validate
    from vllm_seqkv.integration.engine_codec import EngineCodec

    config = AutoConfig.from_pretrained(model_dir)
    return EngineCodec(validate({"kv_cache_backend": "seqkv", "preset": "seqkv-f4", **(options or {})}),
                       str(model_dir), config.num_key_value_heads,
                       config.hidden_size // config.num_attention_heads, kv_dtype=config.dtype)


def test_front_end_counts_one_rope_table_per_distinct_rope_parameter_set():
    from transformers import Gemma3TextConfig, LlamaConfig

    from vllm_seqkv.integration.kv_budget import rope_tables_in_config

    assert rope_tables_in_config(LlamaConfig()) == 1
    assert rope_tables_in_config(LlamaConfig(rope_scaling={"rope_type": "linear", "factor": 2.0})) == 1
    assert rope_tables_in_config(Gemma3TextConfig()) == 2  # sliding-window and global layers
