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
