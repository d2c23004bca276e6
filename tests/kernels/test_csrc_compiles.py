"""Every csrc/ source compiles with nvcc (compile-only: sm_90 and sm_80 device code).

Runs against the installed torch headers (a CPU build here; see csrc/torch_cuda_compat.cuh).
Skipped only when nvcc is absent.
"""

import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "csrc"
SOURCES = [p for pattern in ("*.cu", "rotation/*.cu", "*.cpp") for p in sorted(CSRC.glob(pattern))]
ARCHS = ["-gencode", "arch=compute_90,code=sm_90", "-gencode", "arch=compute_80,code=sm_80"]
NVCC = shutil.which("nvcc") or (shutil.which("/usr/local/cuda/bin/nvcc"))

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not installed")


def nvcc_command(source: Path, output: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{p}" for p in [*include_paths(), sysconfig.get_paths()["include"]]]
    device = ARCHS + ["-diag-suppress", "20013,20015,3189"] if source.suffix == ".cu" else []
    # host code at -O0: the check is for compile errors, not speed
    return [NVCC, "-c", "-std=c++20", "-Xcompiler", "-O0", *device, *includes, "-o", str(output), str(source)]


def object_name(source: Path) -> str:
    """csrc/rotation/write_slots.cu -> rotation-write_slots.cu.o (one folder for all objects)."""
    return "-".join(source.relative_to(CSRC).parts) + ".o"


def compile_one(source: Path, out_dir: Path) -> tuple[Path, subprocess.CompletedProcess]:
    cmd = nvcc_command(source, out_dir / object_name(source))
    return source, subprocess.run(cmd, capture_output=True, text=True, timeout=500)


def test_every_csrc_source_compiles(tmp_path):
    assert {str(p.relative_to(CSRC)) for p in SOURCES} >= {
        "rotation/decode_attention.cu", "rotation/write_slots.cu", "registration.cpp", "write.cu", "decode.cu"}
    with ThreadPoolExecutor(max_workers=len(SOURCES)) as pool:
        results = list(pool.map(lambda s: compile_one(s, tmp_path), SOURCES))
    failures = [f"{src.name}:\n{res.stderr[-4000:]}" for src, res in results if res.returncode]
    assert not failures, "nvcc failed:\n" + "\n".join(failures)
    for src, _ in results:
        assert (tmp_path / object_name(src)).stat().st_size > 0
