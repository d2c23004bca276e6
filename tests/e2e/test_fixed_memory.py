"""seqkv's fixed memory inside vLLM's KV budget, through the real CPU engine (tiny model).

The invariant: with ``--kv-cache-memory-bytes B``, vLLM's block count is the largest ``n``
with ``n * page_bytes + F + sink(n) <= B``, where ``F`` is the persistent parts (token table,
codec constants, kernel params, RoPE tables) and ``sink(n)`` the sink table's bound (one
entry per block, or per vocabulary token with a layer-0 token table, capped by
``sink_table_bytes``); the start-up log names each part and ``/metrics`` exports them.
"""

import re

import pytest
from transformers import AutoConfig

from tests.e2e.engines import engine
from vllm_seqkv.integration.fixed_memory import PARTS
from vllm_seqkv.integration.kv_budget import FIXED_MEMORY_MARKER

pytestmark = pytest.mark.e2e
BUDGET = 32 << 20


def gauges(preset):
    from prometheus_client import REGISTRY

    parts = {part: REGISTRY.get_sample_value("seqkv_fixed_bytes", {"preset": preset, "part": part})
             for part in PARTS}
    return parts, REGISTRY.get_sample_value("seqkv_fixed_bytes_taken_from_kv_budget", {"preset": preset})


def worker_state(worker):
    """In the worker: bytes of the distinct storages of the engine codec's RoPE tables, and the
    dtypes of its sink rows."""
    from vllm_seqkv.integration.engine_codec import active_engine_codec

    engine = active_engine_codec()
    storages = {}
    for rope in engine.rope_tables():
        for tensor in (rope.table, rope.table_on("cpu"), rope.rotation_on("cpu")):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    dtypes = {str(t.dtype) for entry in engine.sinks._exact.values() for row in entry.values() for t in row}
    return sum(storages.values()), len(engine._layer_rope), sorted(dtypes)


@pytest.mark.parametrize("preset", ["seqkv-f4", "seqkv-3"])
def test_blocks_shrink_by_the_fixed_memory_and_it_is_reported(tiny_model_dir, preset, capfd, monkeypatch):
    from vllm import SamplingParams

    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # for collective_rpc(fn)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    layers, heads = config.num_hidden_layers, config.num_key_value_heads
    dim = config.hidden_size // config.num_attention_heads
    with engine(tiny_model_dir, "seqkv", {"preset": preset}, kv_cache_memory_bytes=BUDGET) as llm:
        cache = llm.llm_engine.vllm_config.cache_config
        blocks, block_size = cache.num_gpu_blocks, cache.block_size
        parts, taken = gauges(preset)
        llm.generate(["The os module provides", "import sys"], SamplingParams(max_tokens=4, temperature=0))
        (rope_bytes, rope_layers, sink_dtypes), = llm.collective_rpc(worker_state)
    # what the worker holds is what was counted: one RoPE table (and its rotation) for every
    # layer, sink rows in the model's dtype
    assert rope_layers == layers and rope_bytes == parts["rope_tables"]
    assert sink_dtypes == [str(config.dtype)]
    log = capfd.readouterr()
    line = next(x for x in (log.out + log.err).splitlines() if FIXED_MEMORY_MARKER in x)
    page_bytes = int(re.search(r"pages get \d+ blocks of (\d+) bytes", line)[1])  # vLLM's divisor
    assert page_bytes % (layers * heads * block_size) == 0  # one slot per token, head and layer
    persistent = sum(parts[p] for p in ("token_table", "calibration", "kernel_params", "rope_tables"))
    sink_entry = layers * heads * dim * 2 * config.dtype.itemsize  # one sequence start, K and V, every layer
    # keyed by first token (seqkv-3): one entry per distinct first token of the blocks holding a
    # start, at most min(vocab, blocks); keyed by block (seqkv-f4): one per block
    assert (parts["token_table"] > 0) == (preset == "seqkv-3")
    most_entries = config.vocab_size if preset == "seqkv-3" else BUDGET

    def sink_bound(n):
        return min(64 << 20, min(n, most_entries) * sink_entry)

    expected = max(n for n in range(BUDGET // page_bytes + 1) if n * page_bytes + persistent + sink_bound(n) <= BUDGET)
    sink = sink_bound(expected)
    assert blocks == expected < BUDGET // page_bytes
    assert parts["sink_table"] == sink and taken == persistent + sink
    assert parts["scratch"] > 0 and all(parts[p] > 0 for p in ("calibration", "rope_tables"))
    for part in PARTS:
        assert f"{part.replace('_', ' ')} {int(parts[part]):,}" in line
    assert f"taken from the --kv-cache-memory-bytes KV budget: {int(taken):,} bytes" in line
    assert f"pages get {blocks} blocks" in line and f"({BUDGET // page_bytes} without it)" in line


def test_budget_smaller_than_the_fixed_memory_is_one_clear_error(tiny_model_dir):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_seqkv.config import SeqKVConfigError
    from vllm_seqkv.integration.plugin import register

    register()
    args = EngineArgs(model=str(tiny_model_dir), max_model_len=256, kv_cache_memory_bytes=1 << 18,
                      additional_config={"kv_cache_backend": "seqkv"})
    with pytest.raises(SeqKVConfigError) as error:
        args.create_engine_config()
    message = str(error.value)
    assert "--kv-cache-memory-bytes 262,144 cannot hold seqkv's fixed memory" in message
    needed = int(re.search(r"at least ([\d,]+) bytes", message)[1].replace(",", ""))
    assert needed > 1 << 18 and "calibration" in message and "sink_table_bytes" in message
