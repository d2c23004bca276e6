"""The ``vllm.general_plugins`` entry point.

vLLM calls :func:`register` in every process it starts (API server, engine core, workers),
possibly several times. It is idempotent and cheap: it adds the CLI flag and a hook on the
attention layer's constructor. Nothing else changes unless an engine's config selects seqkv:
the hook reads ``additional_config`` of the engine being built and only then routes the
attention backend to seqkv (and routes it back for an ``auto`` engine in the same process).
"""

from __future__ import annotations

import functools

from vllm_seqkv.config import SeqKVConfig, from_additional_config

BACKEND_CLASS = "vllm_seqkv.integration.backend.SeqKVAttentionBackend"
STATUS = "KV pages hold compressed per-token slots (see the worker log for bits/element)"
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm_seqkv.integration import cli, compat

    cli.install()
    _validate_at_engine_config(compat)
    _hook_attention_constructor(compat)
    _registered = True


def _validate_at_engine_config(compat) -> None:
    """Validate the options once, in the front-end process, before any engine starts."""
    original = compat.EngineArgs.create_engine_config
    if getattr(original, "_seqkv_hook", False):
        return

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        config = from_additional_config(self.additional_config)
        if config.enabled:
            logger().info(
                "seqkv: KV-cache backend selected (preset %s); %s", config.preset, STATUS
            )
        return original(self, *args, **kwargs)

    create_engine_config._seqkv_hook = True
    compat.EngineArgs.create_engine_config = create_engine_config


def logger():
    from vllm_seqkv.integration.compat import init_logger

    return init_logger("vllm.seqkv")


def _hook_attention_constructor(compat) -> None:
    original_init = compat.Attention.__init__
    if getattr(original_init, "_seqkv_hook", False):
        return

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        select_backend_for(compat.get_current_vllm_config())
        original_init(self, *args, **kwargs)

    __init__._seqkv_hook = True
    compat.Attention.__init__ = __init__


def select_backend_for(vllm_config) -> SeqKVConfig:
    """Route this process's attention backend by the config of the engine being built."""
    from vllm_seqkv.integration import compat

    config = from_additional_config(getattr(vllm_config, "additional_config", None))
    if config.enabled:
        compat.override_backend(BACKEND_CLASS)
    else:
        compat.clear_backend_override(BACKEND_CLASS)
    return config

