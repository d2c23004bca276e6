"""seqkv's fixed memory: what it measures, and how many blocks a KV budget leaves the pages."""

import random

import pytest
from transformers import AutoConfig

from tests.e2e.engines import seqkv_fixed_memory
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
    search = 2 * heads * vocab * (dim + 1) * 4  # float32 copies and squared norms
    assert fixed.token_table == bf16_tables + search
    assert fixed.sink_entries_by_token == vocab
    assert fixed.sink_table(10**6) == min(64 << 20, vocab * layers * heads * dim * 2 * 4)
    assert fixed.rope_tables == layers * 2 * 512 * dim * 4
    assert fixed.calibration > 0 and fixed.kernel_params >= 0


def test_per_layer_preset_has_no_token_table_and_a_sink_entry_per_block(tiny_model_dir):
    config = AutoConfig.from_pretrained(tiny_model_dir)
    layers, heads = config.num_hidden_layers, config.num_key_value_heads
    dim = config.hidden_size // config.num_attention_heads
    fixed, _ = seqkv_fixed_memory(tiny_model_dir, {"preset": "seqkv-f4", "sink_table_bytes": 1 << 20})
    assert fixed.token_table == 0 and fixed.sink_entries_by_token is None
    assert fixed.sink_table(100) == 100 * layers * heads * dim * 2 * 4
    assert fixed.sink_table(10**6) == 1 << 20
    assert fixed.kernel_params > 0  # the fused kernels' constants beyond the codec's own
