"""Builds the C++ extensions in csrc/.

- ``vllm_seqkv._cpu`` (csrc/cpu/): the CPU ops over transform-format pages, built on EVERY
  machine (needs a C++17 compiler and torch's headers, no CUDA). Its kernels are compiled three
  times (csrc/cpu/isa_*.cpp: AVX-512, AVX2, portable) with their own -m flags and picked at run
  time from the CPU's features, so the build never depends on the build machine's CPU. Skip it
  with SEQKV_NO_CPU_EXT=1 (the package then runs the slow torch path, and says so).
  SEQKV_CPU_CXXFLAGS adds compiler flags to it (benchmarks/cpu_decode_ablation.py's ablations).
- ``vllm_seqkv._C`` (csrc/*.cu, csrc/rotation/*.cu, csrc/*.cpp): the CUDA ops, only when CUDA
  and a CUDA build of torch exist (a plain CPU install skips them with a message). Force-skip
  with SEQKV_NO_CUDA=1.

Rebuild in place: ``python setup.py build_ext --inplace`` (scripts/setup.sh does it when the
sources' hash changes, see scripts/build_ext.sh).
"""

import os
from pathlib import Path

from setuptools import setup

# per-ISA kernel translation units of vllm_seqkv._cpu and their extra compiler flags
CPU_ISA_SOURCES = {
    "csrc/cpu/isa_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "csrc/cpu/isa_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
    "csrc/cpu/isa_default.cpp": [],
}
CPU_CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-Wno-unused-parameter", "-Wno-unknown-pragmas"]
# extra flags for vllm_seqkv._cpu, e.g. benchmarks/cpu_decode_ablation.py's -DSEQKV_ABLATE_<PART>
CPU_CXX_FLAGS += os.environ.get("SEQKV_CPU_CXXFLAGS", "").split()


def _x86() -> bool:
    import platform

    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def cpu_extension():
    if os.environ.get("SEQKV_NO_CPU_EXT") == "1":
        return None
    from torch.utils.cpp_extension import CppExtension

    isa = {src: flags for src, flags in CPU_ISA_SOURCES.items() if flags == [] or _x86()}
    ext = CppExtension(
        name="vllm_seqkv._cpu",
        sources=["csrc/cpu/transform_cpu_ops.cpp"],
        extra_compile_args={"cxx": CPU_CXX_FLAGS},
        extra_link_args=["-fopenmp"],
        # headers: setuptools rebuilds only when a source or one of these is newer than the .so
        depends=sorted(str(p) for p in [*Path("csrc/cpu").glob("*.h"), *Path("csrc").glob("transform_*.h*")]),
    )
    ext.isa_sources = isa  # compiled separately by build_ext (own flags per file)
    ext.optional = True  # a failed build leaves the package working (torch path, warned at start-up)
    if not _x86():  # only the portable kernels exist: the op layer must not reference the others
        ext.extra_compile_args["cxx"].append("-DSEQKV_CPU_PORTABLE_ONLY")
    return ext


def cuda_extension():
    if os.environ.get("SEQKV_NO_CUDA") == "1":
        return None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension
    except ImportError:
        return None
    if torch.version.cuda is None or CUDA_HOME is None:
        print("vllm-seqkv: no CUDA build of torch / CUDA toolkit: skipping the csrc/ CUDA extension")
        return None
    sources = [str(p) for pattern in ("*.cu", "rotation/*.cu", "*.cpp")
               for p in sorted(Path("csrc").glob(pattern))]
    if not sources:
        return None
    return CUDAExtension(
        name="vllm_seqkv._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3", "-std=c++20"],
                            "nvcc": ["-O3", "-std=c++20", "-diag-suppress", "20013,20015,3189"]},
    )


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    class SeqKVBuildExt(BuildExtension):
        """BuildExtension + per-file flags for the ISA kernel units of ``ext.isa_sources``."""

        def build_extension(self, ext):
            isa_sources = getattr(ext, "isa_sources", None)
            if isa_sources:
                base = list(ext.extra_compile_args["cxx"] if isinstance(ext.extra_compile_args, dict)
                            else ext.extra_compile_args)
                objects = []
                for src, flags in isa_sources.items():
                    print(f"vllm-seqkv: compiling {src} {' '.join(flags) or '(portable)'}", flush=True)
                    objects += self.compiler.compile(
                        [src], output_dir=self.build_temp, macros=ext.define_macros,
                        include_dirs=ext.include_dirs, extra_postargs=base + flags, depends=ext.depends)
                ext.extra_objects = list(ext.extra_objects or []) + objects
                ext.isa_sources = None  # once
            super().build_extension(ext)

    return SeqKVBuildExt.with_options(use_ninja=False)


if __name__ == "__main__":
    try:
        import torch  # noqa: F401
    except ImportError:  # metadata-only builds (no torch yet): no extensions
        setup()
    else:
        ext_modules = [e for e in (cpu_extension(), cuda_extension()) if e is not None]
        setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext_class()} if ext_modules else {})
