"""Repository hygiene that a user depends on: Dockerfile, CI entry point, README commands."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed")
def test_dockerfile_lints_clean_and_serves_seqkv():
    out = subprocess.run(["hadolint", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert text.splitlines()[4].startswith("FROM vllm/vllm-openai:")
    assert '"--kv-cache-backend", "seqkv"' in text


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text().splitlines()
    commands = [line for line in readme[:20] if line.startswith("bash scripts/")]
    assert commands[:2] == ["bash scripts/serve.sh", "bash scripts/test.sh"]
    assert "exec bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_cpu_install_skips_cuda_extension(monkeypatch):
    import torch

    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.chdir(ROOT)
    import setup

    assert torch.version.cuda is None
    assert setup.cuda_extensions() == ([], {})
