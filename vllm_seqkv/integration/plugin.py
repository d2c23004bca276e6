"""The ``vllm.general_plugins`` entry point.

vLLM calls :func:`register` in every process it starts (API server, engine core, workers),
possibly several times. It is idempotent and cheap: it adds the CLI flag, a hook on the
attention layer's constructor and one on the model loader (recording each attention layer's
rotary embedding). Nothing else changes unless an engine's config selects seqkv:
the hook reads ``additional_config`` of the engine being built and only then routes the
attention backend to seqkv (and routes it back for an ``auto`` engine in the same process),
and hooks the worker's KV-memory sizing so that seqkv's fixed memory comes out of the KV
budget (:mod:`.kv_budget`).
"""

from __future__ import annotations

from vllm_seqkv.config import SeqKVConfig, from_additional_config

BACKEND_CLASS = "vllm_seqkv.integration.backend.SeqKVAttentionBackend"
STATUS = "vLLM pages hold the compressed slots; attention reads them (the kernel in use is logged by the worker)"
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
            from vllm_seqkv.integration import kv_budget

            codec = build_codec_for(config, vllm_config.model_config)
            figures = cache_figures(config, vllm_config.model_config, codec)
            fixed = kv_budget.fixed_memory_for(codec, vllm_config)
            kv_budget.check_fixed_memory_fits(fixed, codec, vllm_config)
            metrics.export(figures, vllm_config.cache_config)
            metrics.export_fixed_memory(fixed, config.preset, vllm_config.cache_config,
                                        kv_budget.whole_budget(vllm_config), kv_budget.kv_on_host())
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
        from vllm_seqkv.integration.kv_budget import reserve_fixed_memory

        compat.hook_available_kv_memory(reserve_fixed_memory)
    else:
        compat.clear_backend_override(BACKEND_CLASS)
    return config

