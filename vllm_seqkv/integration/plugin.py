"""The ``vllm.general_plugins`` entry point.

vLLM calls :func:`register` in every process it starts (API server, engine core, workers),
possibly several times. It is idempotent and cheap: it adds the CLI flag, a hook on the
attention layer's constructor and one on the model loader (recording each attention layer's
rotary embedding). Nothing else changes unless an engine's config selects seqkv:
the hook reads ``additional_config`` of the engine being built and only then routes the
attention backend to seqkv (and routes it back for an ``auto`` engine in the same process).
"""

from __future__ import annotations

from vllm_seqkv.config import SeqKVConfig, from_additional_config

BACKEND_CLASS = "vllm_seqkv.integration.backend.SeqKVAttentionBackend"
STATUS = "vLLM pages hold the compressed slots (pure-torch attention path on CPU)"
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm_seqkv.integration import cli, compat

    cli.install()
    from vllm_seqkv.integration import connector

    connector.register()
    _hook_engine_config(compat)
    _hook_attention_constructor(compat)
    compat.hook_model_loader()
    _registered = True


def _hook_engine_config(compat) -> None:
    """In the front-end, before any engine starts: validate options, refuse unsupported
    models, export the cache figures as metrics."""
    compat.wrap_method(compat.EngineArgs, "create_engine_config", _checked_engine_config)


def _checked_engine_config(original):
    from vllm_seqkv.integration import metrics

    def create_engine_config(self, *args, **kwargs):
        config = from_additional_config(self.additional_config)
        if config.enabled:
            select_attention_backend(self)
        if config.cold_tier is not None:
            _select_cold_tier_connector(self)
        vllm_config = original(self, *args, **kwargs)
        if config.enabled:
            from vllm_seqkv.integration.support import check_model_supported

            check_model_supported(vllm_config.model_config, vllm_config)
            from vllm_seqkv.integration.first_start import ensure_calibrated

            ensure_calibrated(config, vllm_config.model_config.model,
                              vllm_config.parallel_config.tensor_parallel_size, logger().info)
            codec = build_codec_for(config, vllm_config.model_config)
            figures = cache_figures(config, vllm_config.model_config, codec)
            fixed = fixed_memory_for(codec, vllm_config)
            check_fixed_memory_fits(fixed, codec, vllm_config)
            metrics.export(figures, vllm_config.cache_config)
            metrics.export_fixed_memory(fixed, config.preset, vllm_config.cache_config,
                                        _whole_budget(vllm_config), compat_is_cpu())
            logger().info(
                "seqkv: KV-cache backend selected (preset %s): %.2f bits/element in the pages, "
                "%.2fx the tokens of a bf16 cache in the same memory; %s",
                config.preset, figures.bits_per_element, figures.ratio_vs_bf16, STATUS,
            )
        return vllm_config
    return create_engine_config


def select_attention_backend(engine_args) -> None:
    """On GPU, point vLLM's backend selection at the CUSTOM slot seqkv registers in (on CPU,
    vLLM always takes CPU_ATTN, which seqkv overrides). A different ``--attention-backend``
    would attend over pages it cannot read: refused, naming both."""
    from vllm_seqkv.config import SeqKVConfigError
    from vllm_seqkv.integration import compat

    slot = compat.backend_slot()
    if slot == compat.AttentionBackendEnum.CPU_ATTN:
        return
    chosen = engine_args.attention_backend or getattr(engine_args.attention_config, "backend", None)
    if chosen is None:
        engine_args.attention_backend = slot
        return
    name = chosen.name if isinstance(chosen, compat.AttentionBackendEnum) else str(chosen).upper()
    if name != slot.name:
        raise SeqKVConfigError(
            f"invalid seqkv config: --kv-cache-backend seqkv attends through vLLM's {slot.name} "
            f"attention backend, but --attention-backend selects {name}; drop --attention-backend")


def _select_cold_tier_connector(engine_args) -> None:
    """``cold_tier`` in the seqkv options -> vLLM's kv_transfer_config for our connector."""
    from vllm_seqkv.config import SeqKVConfigError
    from vllm_seqkv.integration.connector import CONNECTOR_NAME, kv_transfer_config_for

    current = engine_args.kv_transfer_config
    if current is not None and current.kv_connector != CONNECTOR_NAME:
        raise SeqKVConfigError(
            f"invalid seqkv config: option 'cold_tier' needs the {CONNECTOR_NAME} KV connector, "
            f"but --kv-transfer-config selects {current.kv_connector!r}; drop one of them")
    if current is None:
        engine_args.kv_transfer_config = kv_transfer_config_for()


def build_codec_for(config: SeqKVConfig, model_config):
    from vllm_seqkv.integration.engine_codec import build_codec

    return build_codec(config, model_config)


def cache_figures(config: SeqKVConfig, model_config, codec=None):
    from vllm_seqkv.integration.metrics import CacheFigures

    codec = codec or build_codec_for(config, model_config)
    return CacheFigures(config.preset, codec.slot_bytes, codec.head_dim, codec.num_kv_heads,
                        model_config.get_total_num_hidden_layers())


# ---- fixed memory: counted inside vLLM's KV budget (see vllm_seqkv.integration.fixed_memory)
FIXED_MEMORY_MARKER = "seqkv: fixed memory outside the pages"


def fixed_memory_for(engine, vllm_config):
    """:class:`~.fixed_memory.FixedMemory` of an engine codec for the engine ``vllm_config``
    builds (its layers on this worker, its ``max_model_len``)."""
    from vllm_seqkv.integration.fixed_memory import fixed_memory_of

    model_config = vllm_config.model_config
    return fixed_memory_of(engine, model_config.get_num_layers(vllm_config.parallel_config),
                           model_config.max_model_len)


def _whole_budget(vllm_config) -> bool:
    from vllm_seqkv.integration import compat

    return compat.explicit_kv_budget(vllm_config.cache_config) is not None


def compat_is_cpu() -> bool:
    from vllm_seqkv.integration import compat

    return compat.is_cpu()


def check_fixed_memory_fits(fixed, engine, vllm_config) -> None:
    """In the front-end: an explicit KV budget must hold seqkv's fixed memory and one block of
    pages (estimated as every layer's page of one block: vLLM's block can only be smaller)."""
    from vllm_seqkv.config import SeqKVConfigError

    budget = vllm_config.cache_config.kv_cache_memory_bytes
    if budget is None:
        return
    block_size = vllm_config.cache_config.block_size or 0
    per_block = (vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
                 * engine.num_kv_heads * block_size * engine.slot_bytes)
    needed = per_block + fixed.taken(1, True, compat_is_cpu())
    if needed > budget:
        raise SeqKVConfigError(_too_small_message(fixed, budget, needed, per_block))


def _too_small_message(fixed, budget: int, needed: int, per_block: int, whole_budget: bool = True) -> str:
    from vllm_seqkv.integration.fixed_memory import describe

    given = "--kv-cache-memory-bytes" if whole_budget else "the KV budget vLLM measured"
    raise_it = ("Give --kv-cache-memory-bytes at least" if whole_budget
                else "Raise --gpu-memory-utilization (or give --kv-cache-memory-bytes) to leave at least")
    return (f"invalid seqkv config: {given} {budget:,} cannot hold seqkv's fixed memory and one "
            f"block of pages ({per_block:,} bytes): "
            f"{describe(fixed, 1, whole_budget, compat_is_cpu())}. {raise_it} {needed:,} bytes, "
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
    fixed = fixed_memory_for(active_engine_codec(), vllm_config)
    per_block = compat.kv_pool_bytes_per_block(worker)
    whole, on_host = _whole_budget(vllm_config), compat.is_cpu()
    blocks = fixed.blocks_within(available, per_block, whole, on_host)
    if blocks < 1:
        raise FixedMemoryError(_too_small_message(
            fixed, available, per_block + fixed.taken(1, whole, on_host), per_block, whole))
    logger().info("%s: %s; the pages get %d blocks of %d bytes (%d without it)", FIXED_MEMORY_MARKER,
                  describe(fixed, blocks, whole, on_host), blocks, per_block, available // per_block)
    return blocks * per_block


def logger():
    from vllm_seqkv.integration.compat import init_logger

    return init_logger("vllm.seqkv")


def _hook_attention_constructor(compat) -> None:
    compat.on_attention_init(select_backend_for)


def select_backend_for(vllm_config) -> SeqKVConfig:
    """Route this process's attention backend by the config of the engine being built."""
    from vllm_seqkv.integration import compat

    config = from_additional_config(getattr(vllm_config, "additional_config", None))
    if config.enabled:
        compat.override_backend(BACKEND_CLASS)
        compat.hook_available_kv_memory(reserve_fixed_memory)
    else:
        compat.clear_backend_override(BACKEND_CLASS)
    return config

