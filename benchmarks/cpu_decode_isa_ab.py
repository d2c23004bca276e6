"""Paired A/B of the seqkv CPU decode op under two instruction-set builds of the same extension,
in one process: calls of vLLM's op and of the seqkv op under each ISA interleaved (the ISA
switched with ``torch.ops.seqkv.cpu_kernel_isa`` before each call), medians per round, and per
round the ratio of the two seqkv times. Within one process that ratio is stable to ~1 %; across
processes it moved by up to ~10 % on our VMs (where each process's buffers land), so run several
processes and read the median of their ratios::

    for i in 1 2 3 4 5 6; do taskset -c 1 python -m benchmarks.cpu_decode_isa_ab \\
        --cells smollm2:4096:1,llama8b:4096:1,smollm2:16384:1 --isas avx512,avx512bf16 --rounds 2; done

(``avx512bf16`` exists only with ``benchmarks/patches/cpu_bf16_dot_products.patch`` applied:
BENCHMARKS.md, "bf16 dot products (tried)".) Layers and pages as ``benchmarks.cpu_decode``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.cpu_decode import (  # noqa: E402
    ROPE_THETA, SHAPES, f4_layouts, interleaved, seqkv_case, shuffled_block_table, vllm_case)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu_decode_isa_ab", description=__doc__.split("\n")[0])
    parser.add_argument("--cells", default="smollm2:4096:1,llama8b:4096:1,smollm2:16384:1",
                        help="shape:context:batch, comma-separated")
    parser.add_argument("--isas", default="avx512,avx2", help="two ISAs of the seqkv op: A,B")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=7, help="interleaved calls per round")
    args = parser.parse_args(argv)
    from vllm_seqkv.kernels.cpu_ops import load_cpu_ops

    if not load_cpu_ops():
        raise SystemExit("vllm_seqkv._cpu does not load")
    isa_a, isa_b = args.isas.split(",")
    torch.set_num_threads(1)
    results = {}
    try:
        for cell in args.cells.split(","):
            shape, ctx, batch = cell.split(":")
            ctx, batch = int(ctx), int(batch)
            q_heads, kv_heads, dim = SHAPES[shape]
            table = shuffled_block_table(ctx, batch)
            layout = f4_layouts(shape, kv_heads, dim, 15)["pair"]
            run_vllm = vllm_case(q_heads, kv_heads, dim, ctx, batch, table)[0]()
            run_seqkv = seqkv_case(q_heads, kv_heads, dim, ctx, batch, table, layout, ROPE_THETA[shape])[0]

            def under(isa):
                def run():
                    torch.ops.seqkv.cpu_kernel_isa(isa)
                    run_seqkv()
                return run

            fns = {"vllm": run_vllm, isa_a: under(isa_a), isa_b: under(isa_b)}
            rounds = [interleaved(fns, args.calls)[0] for _ in range(args.rounds)]
            ratios = [r[isa_a] / r[isa_b] for r in rounds]
            results[cell] = {"ms": {k: statistics.median(r[k] for r in rounds) for k in fns},
                             f"{isa_a}_over_{isa_b}": statistics.median(ratios), "per_round": ratios}
            print(f"{cell}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in results[cell]["ms"].items())
                  + f"; {isa_a} / {isa_b} time {statistics.median(ratios):.3f} (rounds "
                  + " ".join(f"{x:.2f}" for x in ratios) + ")", flush=True)
    finally:
        torch.ops.seqkv.cpu_kernel_isa("auto")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
