"""seqkv's fixed memory inside vLLM's KV budget: the checks and the hook around vLLM.

The front-end (:func:`check_fixed_memory_fits`, before any engine starts) refuses an explicit
budget that cannot hold the fixed memory and one block; the worker (:func:`reserve_fixed_memory`,
wrapped around vLLM's ``determine_available_memory`` by :func:`~.compat.hook_available_kv_memory`)
gives the pages what is left, in whole blocks, and logs the parts. What the parts are and what
is taken: :mod:`vllm_seqkv.integration.fixed_memory`.
"""

from __future__ import annotations

from vllm_seqkv.config import SeqKVConfigError, from_additional_config

FIXED_MEMORY_MARKER = "seqkv: fixed memory outside the pages"


def logger():
    from vllm_seqkv.integration.compat import init_logger

    return init_logger("vllm.seqkv")


def fixed_memory_for(engine, vllm_config, model_loaded: bool = False):
    """:class:`~.fixed_memory.FixedMemory` of an engine codec for the engine ``vllm_config``
    builds (its layers on this worker, its ``max_model_len``). ``model_loaded`` (in the worker,
    after vLLM loaded the model): the RoPE tables are counted from the layers' own rotary
    embeddings; before (the front-end), from the model config (:func:`rope_tables_in_config`)."""
    from vllm_seqkv.integration import compat
    from vllm_seqkv.integration.fixed_memory import fixed_memory_of

    model_config = vllm_config.model_config
    if model_loaded:
        rope_tables = compat.distinct_rotary_tables(compat.attention_layer_names(vllm_config),
                                                    model_config.max_model_len)
    else:
        rope_tables = rope_tables_in_config(model_config.hf_config)
    return fixed_memory_of(engine, model_config.get_num_layers(vllm_config.parallel_config),
                           model_config.max_model_len, rope_tables, pages_on_cpu=kv_on_host())


def rope_tables_in_config(hf_config) -> int:
    """Distinct RoPE tables a transformers config asks for: one per distinct RoPE parameter
    set (Gemma-3: one for its sliding-window layers, one for its global ones)."""
    import json

    from vllm_seqkv.integration.support import rope_parameter_sets

    sets = {json.dumps(rope, sort_keys=True, default=str) for rope in rope_parameter_sets(hf_config)}
    return max(len(sets), 1)


def whole_budget(vllm_config) -> bool:
    from vllm_seqkv.integration import compat

    return compat.explicit_kv_budget(vllm_config.cache_config) is not None


def kv_on_host() -> bool:
    from vllm_seqkv.integration import compat

    return compat.is_cpu()


def check_fixed_memory_fits(fixed, engine, vllm_config) -> None:
    """In the front-end: an explicit KV budget must hold seqkv's fixed memory and one block of
    pages (estimated as every layer's page of one block: vLLM's block can only be smaller)."""
    budget = vllm_config.cache_config.kv_cache_memory_bytes
    if budget is None:
        return
    block_size = vllm_config.cache_config.block_size or 0
    per_block = (vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
                 * engine.num_kv_heads * block_size * engine.slot_bytes)
    needed = per_block + fixed.taken(1, True, kv_on_host())
    if needed > budget:
        raise SeqKVConfigError(_too_small_message(fixed, budget, needed, per_block))


def _too_small_message(fixed, budget: int, needed: int, per_block: int, explicit: bool = True) -> str:
    from vllm_seqkv.integration.fixed_memory import describe

    given = "--kv-cache-memory-bytes" if explicit else "the KV budget vLLM measured"
    raise_it = ("Give --kv-cache-memory-bytes at least" if explicit
                else "Raise --gpu-memory-utilization (or give --kv-cache-memory-bytes) to leave at least")
    return (f"invalid seqkv config: {given} {budget:,} cannot hold seqkv's fixed memory and one "
            f"block of pages ({per_block:,} bytes): "
            f"{describe(fixed, 1, explicit, kv_on_host())}. {raise_it} {needed:,} bytes, "
            "or lower the seqkv option sink_table_bytes")


def reserve_fixed_memory(worker, available: int) -> int:
    """In the worker, after vLLM sized the KV budget: the bytes its pages get once seqkv's
    fixed memory is taken out (a whole number of blocks: the largest ``n`` with ``n *
    bytes_per_block + taken(n) <= available``); logs the parts. Other engines: unchanged."""
    from vllm_seqkv.integration import compat
    from vllm_seqkv.integration.engine_codec import active_engine_codec
    from vllm_seqkv.integration.fixed_memory import FixedMemoryError, describe

    vllm_config = worker.vllm_config
    if not from_additional_config(vllm_config.additional_config).enabled:
        return available
    fixed = fixed_memory_for(active_engine_codec(), vllm_config, model_loaded=True)
    per_block = compat.kv_pool_bytes_per_block(worker)
    whole, on_host = whole_budget(vllm_config), compat.is_cpu()
    blocks = fixed.blocks_within(available, per_block, whole, on_host)
    if blocks < 1:
        raise FixedMemoryError(_too_small_message(
            fixed, available, per_block + fixed.taken(1, whole, on_host), per_block, whole))
    logger().info("%s: %s; the pages get %d blocks of %d bytes (%d without it)", FIXED_MEMORY_MARKER,
                  describe(fixed, blocks, whole, on_host), blocks, per_block, available // per_block)
    return blocks * per_block
