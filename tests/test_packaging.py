"""Repository hygiene that a user depends on: Dockerfile, CI entry point, README commands."""

import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).parents[1]


def test_dockerfile_lints_clean_and_serves_seqkv():
    hadolint = Path(sys.executable).with_name("hadolint")  # installed by requirements/dev.txt
    out = subprocess.run([str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert [line for line in text.splitlines() if line.startswith("FROM")] == [
        "FROM vllm/vllm-openai:v0.32.0"]
    assert '"--kv-cache-backend", "seqkv"' in text


def test_docker_image_calibrates_into_the_documented_volume():
    """First start calibrates into SEQKV_HOME: it must be inside a VOLUME, and the README's
    `docker run` must mount that volume (else every container start refits)."""
    text = (ROOT / "Dockerfile").read_text()
    home = next(line.split("=", 1)[1] for line in text.splitlines() if line.startswith("ENV SEQKV_HOME="))
    volume = next(line for line in text.splitlines() if line.startswith("VOLUME"))
    mount = volume.split('"')[1]
    assert home.startswith(mount + "/")
    readme = (ROOT / "README.md").read_text()
    runs = [line for line in readme.splitlines() if line.startswith("docker run")]
    assert runs and all(f":{mount}" in line and "--gpus" in line for line in runs), runs


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
    assert setup.cuda_extension() is None
    assert setup.cpu_extension().name == "vllm_seqkv._cpu"  # the C++ CPU ops build everywhere
