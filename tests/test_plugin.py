"""The general-plugin entry point: declared, idempotent, cheap, inert unless selected."""

import subprocess
import sys
from importlib.metadata import entry_points


def test_entry_point_is_declared():
    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("seqkv") == "vllm_seqkv.integration.plugin:register"


def test_importing_the_plugin_is_cheap():
    code = ("import sys, vllm_seqkv.integration.plugin as p; "
            "print(any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules), "
            "'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_register_is_idempotent():
    from vllm_seqkv.integration import compat
    from vllm_seqkv.integration.plugin import register

    register()
    hooks = (compat.EngineArgs.add_cli_args, compat.EngineArgs.from_cli_args,
             compat.EngineArgs.create_engine_config, compat.Attention.__init__)
    register()
    assert hooks == (compat.EngineArgs.add_cli_args, compat.EngineArgs.from_cli_args,
                     compat.EngineArgs.create_engine_config, compat.Attention.__init__)


def test_backend_routed_only_when_seqkv_selected():
    from types import SimpleNamespace

    from vllm_seqkv.integration import compat
    from vllm_seqkv.integration.plugin import BACKEND_CLASS, select_backend_for

    slot = compat.backend_slot()
    stock = slot.get_path()
    select_backend_for(SimpleNamespace(additional_config={}))
    assert slot.get_path() == stock
    select_backend_for(SimpleNamespace(additional_config={"kv_cache_backend": "seqkv"}))
    assert slot.get_path() == BACKEND_CLASS
    select_backend_for(SimpleNamespace(additional_config={"kv_cache_backend": "auto"}))
    assert slot.get_path() == stock


def _engine_args(backend=None):
    from types import SimpleNamespace

    return SimpleNamespace(attention_backend=backend, attention_config=SimpleNamespace(backend=None))


def test_on_gpu_seqkv_selects_the_custom_backend_slot(monkeypatch):
    from types import SimpleNamespace

    import pytest

    from vllm_seqkv.config import SeqKVConfigError
    from vllm_seqkv.integration import compat
    from vllm_seqkv.integration.plugin import BACKEND_CLASS, select_attention_backend, select_backend_for

    custom = compat.AttentionBackendEnum.CUSTOM
    monkeypatch.setattr(compat, "backend_slot", lambda: custom)
    args = _engine_args()
    select_attention_backend(args)
    assert args.attention_backend == custom
    select_attention_backend(_engine_args("custom"))  # the user's own choice of the same slot
    with pytest.raises(SeqKVConfigError, match="FLASH_ATTN"):
        select_attention_backend(_engine_args(compat.AttentionBackendEnum.FLASH_ATTN))
    try:
        select_backend_for(SimpleNamespace(additional_config={"kv_cache_backend": "seqkv"}))
        assert custom.get_path() == BACKEND_CLASS
    finally:
        select_backend_for(SimpleNamespace(additional_config={"kv_cache_backend": "auto"}))
    assert not custom.is_overridden()


def test_on_cpu_the_backend_choice_is_left_to_vllm():
    from vllm_seqkv.integration.plugin import select_attention_backend

    args = _engine_args()
    select_attention_backend(args)  # the CPU platform always takes CPU_ATTN (overridden)
    assert args.attention_backend is None
