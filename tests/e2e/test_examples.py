"""Every example a user copies runs (on the tiny model, to keep CI short)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
EXAMPLES = Path(__file__).parents[2] / "examples"


def test_offline_shared_prefix(tiny_model_dir):
    out = subprocess.run([sys.executable, str(EXAMPLES / "offline_shared_prefix.py"),
                          str(tiny_model_dir)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(re.search(r"KV capacity: ([\d,]+) tokens", out.stdout)[1].replace(",", "")) > 0
    cached = [int(m) for m in re.findall(r"cached prompt tokens: (\d+)/", out.stdout)]
    assert len(cached) == 3 and max(cached) > 0


def test_capacity_gain(tiny_model_dir):
    out = subprocess.run([sys.executable, str(EXAMPLES / "capacity_gain.py"), str(tiny_model_dir),
                          "--kv-cache-memory-bytes", str(32 << 20)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    gain = float(re.search(r"capacity gain: ([\d.]+)x", out.stdout)[1])
    taken = int(re.search(r"fixed memory taken from the budget: ([\d,]+) bytes", out.stdout)[1].replace(",", ""))
    budget = 32 << 20
    assert "preset seqkv-f4" in out.stdout  # the serving default
    assert 0 < taken < budget / 2
    auto_bits = float(re.search(r"auto : +[\d,]+ tokens, ([\d.]+) bits/element", out.stdout)[1])
    seqkv_bits, slot_bits = map(float, re.search(
        r"seqkv: +[\d,]+ tokens, ([\d.]+) bits/element \(([\d.]+) in the page slots\)", out.stdout).groups())
    assert auto_bits == pytest.approx(16, rel=0.02)
    assert slot_bits == pytest.approx(4.0)  # seqkv-f4: K 3.5 + V 4.5 bits, every field counted
    assert gain * budget / (budget - taken) == pytest.approx(16 / slot_bits, rel=0.05)  # the pages' share
    assert seqkv_bits == pytest.approx(slot_bits * budget / (budget - taken), rel=0.05)
    assert gain == pytest.approx(auto_bits / seqkv_bits, rel=0.03)


def test_openai_chat_against_the_server(tiny_model_dir, tmp_path):
    from benchmarks.server import VllmServer

    args = ["--served-model-name", "tiny", "--max-model-len", "512",
            "--kv-cache-memory-bytes", str(32 << 20), "--kv-cache-backend", "seqkv"]
    with VllmServer(tiny_model_dir, args, tmp_path / "vllm.log") as server:
        out = subprocess.run([sys.executable, str(EXAMPLES / "openai_chat.py"),
                              "--base-url", server.base_url + "/v1", "--max-tokens", "16"],
                             capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "model: tiny" in out.stdout
    assert out.stdout.count("assistant:") == 2
    prompt, completion = map(int, re.search(r"tokens: (\d+) prompt \+ (\d+) completion", out.stdout).groups())
    assert prompt > 0 and 0 < completion <= 16
