"""The C++ CPU block reconstruction (the prefill path's read of cached blocks,
``torch.ops.seqkv.cpu_reconstruct_transform_blocks``) per instruction-set build, one thread: whole
blocks of the default preset's pages (SmolLM2 layer shape and calibration, as
``benchmarks.cpu_decode``) to float32 K (RoPE-rotated) / V, with torch's SDPA of one 128-query
prefill chunk over the same positions beside it for scale::

    taskset -c 1 python -m benchmarks.cpu_reconstruct --positions 4096 --isas avx512,avx2,scalar
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.cpu_decode import BLOCK, ROPE_THETA, SHAPES, f4_layouts, interleaved  # noqa: E402


def median_ms(fn, calls: int) -> float:
    return interleaved({"fn": fn}, calls)[0]["fn"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu_reconstruct", description=__doc__.split("\n")[0])
    parser.add_argument("--positions", type=int, default=4096, help="cached positions of one sequence (whole blocks)")
    parser.add_argument("--isas", default="avx512,avx2,scalar", help="builds to time (those the CPU lacks are skipped)")
    parser.add_argument("--calls", type=int, default=15)
    args = parser.parse_args(argv)
    from vllm_seqkv.kernels import cpu_ops
    from vllm_seqkv.kernels.params import rope_cache, transform_layer_params

    if not cpu_ops.load_cpu_ops():
        raise SystemExit(f"vllm_seqkv._cpu does not load: {cpu_ops.load_error()}")
    torch.set_num_threads(1)
    q_heads, kv_heads, dim = SHAPES["smollm2"]
    params = transform_layer_params(f4_layouts("smollm2", kv_heads, dim, 15)["pair"])
    blocks = -(-args.positions // BLOCK)
    gen = torch.Generator().manual_seed(0)
    pages = torch.randint(0, 256, (blocks, kv_heads, BLOCK, params.slot_bytes), dtype=torch.uint8, generator=gen)
    ids = torch.randperm(blocks, generator=gen)
    rope = rope_cache(blocks * BLOCK, dim, ROPE_THETA["smollm2"])
    positions = torch.arange(blocks) * BLOCK
    results = {}
    try:
        for isa in args.isas.split(","):
            try:
                torch.ops.seqkv.cpu_kernel_isa(isa)
            except RuntimeError:
                print(f"{isa}: not on this CPU, skipped")
                continue
            results[isa] = median_ms(lambda: cpu_ops.reconstruct_transform_blocks_cpp(
                pages, ids, params, rope=rope, block_positions=positions), args.calls)
            print(f"{isa}: reconstruct {blocks * BLOCK} positions x {kv_heads} heads: {results[isa]:.3f} ms",
                  flush=True)
    finally:
        torch.ops.seqkv.cpu_kernel_isa("auto")
    q = torch.randn(1, q_heads, 128, dim, generator=gen)
    k, v = (torch.randn(1, q_heads, blocks * BLOCK, dim, generator=gen) for _ in range(2))
    results["sdpa_chunk"] = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), args.calls)
    print(f"torch SDPA, 128 queries x {blocks * BLOCK} positions x {q_heads} heads: {results['sdpa_chunk']:.3f} ms")
    return results


if __name__ == "__main__":
    main()
