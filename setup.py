"""Builds the optional CUDA extension in csrc/ only when CUDA and a CUDA build of torch exist.

A plain CPU install (our dev/CI machines) gets the pure-Python package; the extension is
skipped with a message, never an error. Force-skip with SEQKV_NO_CUDA=1.
"""

import os
from pathlib import Path

from setuptools import setup


def cuda_extensions():
    if os.environ.get("SEQKV_NO_CUDA") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        print("vllm-seqkv: no CUDA build of torch / CUDA toolkit: skipping csrc/ extension")
        return [], {}
    sources = sorted(str(p) for p in Path("csrc").glob("*.cu")) + sorted(
        str(p) for p in Path("csrc").glob("*.cpp")
    )
    if not sources:
        return [], {}
    ext = CUDAExtension(
        name="vllm_seqkv._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3", "-std=c++20"],
                            "nvcc": ["-O3", "-std=c++20", "-diag-suppress", "20013,20015,3189"]},
    )
    return [ext], {"build_ext": BuildExtension}


if __name__ == "__main__":
    ext_modules, cmdclass = cuda_extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
