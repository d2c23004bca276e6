"""The ``--kv-cache-backend {auto,seqkv}`` flag of ``vllm serve`` / ``EngineArgs``.

vLLM has no CLI-plugin hook, so the plugin wraps ``EngineArgs.add_cli_args`` (adds the flag)
and ``EngineArgs.from_cli_args`` (copies the parsed value into ``additional_config``, which
vLLM ships to the engine core and every worker inside ``VllmConfig``).
"""

from __future__ import annotations

import argparse
import json

from vllm_seqkv.config import (
    BACKEND_KEY,
    KV_CACHE_BACKENDS,
    SeqKVConfigError,
    from_additional_config,
)
from vllm_seqkv.integration import compat
from vllm_seqkv.integration.compat import EngineArgs

FLAG = "--kv-cache-backend"
_DEST = "kv_cache_backend"


def install() -> None:
    compat.wrap_method(EngineArgs, "add_cli_args", _with_flag)
    compat.wrap_method(EngineArgs, "from_cli_args", _with_backend_choice)


def _with_flag(original):
    def add_cli_args(parser, *args, **kwargs):
        parser = original(parser, *args, **kwargs)
        add_flag(parser)
        return parser
    return add_cli_args


def _with_backend_choice(original):
    def from_cli_args(cls, args: argparse.Namespace):
        engine_args = original(cls, args)
        choice = getattr(args, _DEST, None)
        if choice is not None:
            engine_args.additional_config = with_backend(engine_args.additional_config, choice)
        try:
            from_additional_config(engine_args.additional_config)
        except SeqKVConfigError as exc:
            raise SystemExit(f"error: {exc}") from None
        return engine_args
    return from_cli_args


def add_flag(parser: argparse.ArgumentParser) -> None:
    if compat.parser_has_option(parser, FLAG):
        return
    parser.add_argument(
        FLAG,
        dest=_DEST,
        choices=list(KV_CACHE_BACKENDS),
        default=None,
        help="KV-cache backend: 'auto' = vLLM's own cache, 'seqkv' = vllm-seqkv compressed "
        "cache (plugin options go in --additional-config '{\"seqkv\": {...}}').",
    )


def with_backend(additional_config, choice: str) -> dict:
    if isinstance(additional_config, str):
        additional_config = json.loads(additional_config)
    return {**(additional_config or {}), BACKEND_KEY: choice}
