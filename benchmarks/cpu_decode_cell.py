"""One cell of :mod:`benchmarks.cpu_decode` timed alone: the op called back to back for
``--seconds`` (after warm-up), mean time per call printed. For profiles and A/B runs of two
builds, where the interleaved table cannot help (one process loads one build):

    taskset -c 1 python -m benchmarks.cpu_decode_cell smollm2 4096 1
    taskset -c 1 perf record -e cpu-clock -F 20000 python -m benchmarks.cpu_decode_cell smollm2 4096 1 --seconds 8
    # A/B: run it alternately from two checkouts (PYTHONPATH=<checkout>), several processes each

Same pages, layouts and thread count (1) as the op table: seqkv-f4 format, block 128, shuffled
block tables; ``--vllm`` times vLLM's CPU attention op on the bf16 cache of the same shape.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks import cpu_decode


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("shape", choices=sorted(cpu_decode.SHAPES))
    parser.add_argument("context", type=int)
    parser.add_argument("batch", type=int)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--vllm", action="store_true", help="vLLM's op over a bf16 cache instead of seqkv's")
    parser.add_argument("--layer", type=int, default=15, help="SmolLM2 layer whose seqkv-f4 calibration is used")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    q_heads, kv_heads, dim = cpu_decode.SHAPES[args.shape]
    table = cpu_decode.shuffled_block_table(args.context, args.batch)
    if args.vllm:
        make_run, nbytes, _ = cpu_decode.vllm_case(q_heads, kv_heads, dim, args.context, args.batch, table)
        run = make_run()
    else:
        layout = cpu_decode.f4_layouts(args.shape, kv_heads, dim, args.layer)["pair"]
        run, nbytes = cpu_decode.seqkv_case(q_heads, kv_heads, dim, args.context, args.batch, table, layout,
                                            cpu_decode.ROPE_THETA[args.shape])
    for _ in range(5):
        run()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        run()
        calls += 1
    per_call = (time.perf_counter() - start) / calls
    print(f"{'vllm' if args.vllm else 'seqkv'} {args.shape} {args.context}x{args.batch}: {per_call * 1e3:.4f} ms/call "
          f"({calls} calls, cache {nbytes / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
