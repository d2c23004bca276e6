"""`--kv-cache-backend` on the real vLLM CLI, and config errors before any engine starts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

VLLM = str(Path(sys.executable).with_name("vllm"))


def run_vllm(*args, timeout=120):
    return subprocess.run([VLLM, *args], capture_output=True, text=True, timeout=timeout)


def test_flag_reaches_additional_config(tiny_model_dir):
    model = str(tiny_model_dir)
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm_seqkv.integration.plugin import register

    register()
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", model, "--kv-cache-backend", "seqkv",
                              "--additional-config", json.dumps({"seqkv": {"preset": "seqkv-4"}})])
    engine_args = AsyncEngineArgs.from_cli_args(args)
    assert engine_args.additional_config["kv_cache_backend"] == "seqkv"
    assert engine_args.additional_config["seqkv"] == {"preset": "seqkv-4"}
    default = AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", model]))
    assert "kv_cache_backend" not in (default.additional_config or {})


def test_bogus_choice_is_one_line_error_before_engine(tmp_path):
    out = run_vllm("serve", str(tmp_path), "--kv-cache-backend", "bogus")
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert "--kv-cache-backend: invalid choice: 'bogus' (choose from 'auto', 'seqkv')" in last
    assert "Initializing a V1 LLM engine" not in out.stdout + out.stderr


@pytest.mark.parametrize(
    "options, needle",
    [({"preset": "seqkv-99"}, "option 'preset'"), ({"bogus_option": 1}, "unknown option 'bogus_option'")],
)
def test_bad_config_is_one_line_error_before_engine(tiny_model_dir, options, needle):
    out = run_vllm("serve", str(tiny_model_dir), "--kv-cache-backend", "seqkv",
                   "--additional-config", json.dumps({"seqkv": options}))
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: invalid seqkv config:") and needle in last
    assert "Initializing a V1 LLM engine" not in out.stdout + out.stderr


def test_help_lists_the_flag():
    out = run_vllm("serve", "--help=all")
    assert "--kv-cache-backend" in out.stdout
