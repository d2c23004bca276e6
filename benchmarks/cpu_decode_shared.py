"""Op-level CPU decode over a shared prefix: ``n`` sequences whose first ``ctx - 128`` positions
sit in the same blocks (prefix caching: one system prompt, many chats) and whose last block is
their own. Three ways, one process, calls interleaved, same thread count:

* ``vllm``: the attention op of vLLM's CPU backend over a bf16 cache (it reads the shared
  blocks once per sequence, from cache after the first);
* ``seqkv_per_sequence``: seqkv's fused decode, every sequence over all of its positions (what
  the engine ran before shared prefixes were planned);
* ``seqkv_shared``: what the engine runs now (``integration/decode_plan.py``): the prefix read
  once with the ``n`` sequences' queries stacked per KV head (no own token), each sequence's
  last block from the prefix's end, the two merged by their log-sum-exps.

Pages, layouts and the vLLM op as in :mod:`benchmarks.cpu_decode` (seqkv-f4 format, block 128).

    python -m benchmarks.cpu_decode_shared [--threads 1,2]   # writes benchmarks/cpu_decode_shared.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

from benchmarks.cpu_decode import BLOCK, ROPE_THETA, SHAPES, f4_layouts, interleaved, machine, uptime, vllm_case


def shared_table(sharers: int, ctx: int) -> torch.Tensor:
    """``[n, ctx / 128]``: the same leading blocks, one block of each sequence's own last."""
    blocks = -(-ctx // BLOCK)
    table = torch.arange(blocks - 1, dtype=torch.int32).repeat(sharers, 1)
    own = torch.arange(blocks - 1, blocks - 1 + sharers, dtype=torch.int32)[:, None]
    return torch.cat([table, own], 1)


def seqkv_cases(q_heads, kv_heads, dim, ctx, sharers, table, layout, rope_theta):
    from vllm_seqkv.integration.decode_plan import merge_partial_attention, stack_sharers, unstack_sharers
    from vllm_seqkv.kernels.cpu_ops import transform_decode_attention_cpp
    from vllm_seqkv.kernels.params import rope_cache, transform_layer_params

    params = transform_layer_params(layout)
    pages = torch.randint(0, 256, (int(table.max()) + 1, kv_heads, BLOCK, layout.slot_bytes), dtype=torch.uint8)
    query = torch.randn(sharers, q_heads, dim)
    own = torch.randn(sharers, kv_heads, dim)
    seq_lens = torch.full((sharers,), ctx, dtype=torch.int32)
    rope = rope_cache(ctx, dim, rope_theta)
    scale = dim ** -0.5
    length = (table.shape[1] - 1) * BLOCK
    prefix_lens = torch.tensor([length + 1], dtype=torch.int32)

    def per_sequence():
        return transform_decode_attention_cpp(query, own, own, pages, table, seq_lens, params, scale, rope=rope)

    def shared():
        head, head_lse = unstack_sharers(*transform_decode_attention_cpp(
            stack_sharers(query, kv_heads), None, None, pages, table[:1, :-1], prefix_lens, params, scale, rope=rope,
            return_lse=True), sharers, kv_heads)
        rest, rest_lse = transform_decode_attention_cpp(query, own, own, pages, table, seq_lens, params, scale,
                                                        rope=rope, skip_first=length, return_lse=True)
        return merge_partial_attention(head, head_lse, rest, rest_lse)

    torch.testing.assert_close(shared(), per_sequence(), atol=1e-3, rtol=1e-3)  # float32 sums in another order
    return per_sequence, shared


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="smollm2,llama8b")
    parser.add_argument("--contexts", default="4096,16384")
    parser.add_argument("--sharers", default="2,4,16,32")
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--out", default="benchmarks/cpu_decode_shared.json")
    args = parser.parse_args(argv)

    from vllm_seqkv.kernels.cpu_ops import active_isa, load_cpu_ops, load_error

    if not load_cpu_ops():
        sys.exit(f"vllm_seqkv._cpu is not built ({load_error()}): run bash scripts/setup.sh")
    machine_info = machine()
    rows = []
    for shape in args.shapes.split(","):
        q_heads, kv_heads, dim = SHAPES[shape]
        layout = f4_layouts(shape, kv_heads, dim, args.layer)["pair"]
        rope_theta = ROPE_THETA[shape]
        for ctx in map(int, args.contexts.split(",")):
            for sharers in map(int, args.sharers.split(",")):
                table = shared_table(sharers, ctx)
                make_vllm_run, _, isa = vllm_case(q_heads, kv_heads, dim, ctx, sharers, table)
                per_sequence, shared = seqkv_cases(q_heads, kv_heads, dim, ctx, sharers, table, layout, rope_theta)
                for threads in sorted({int(t) for t in args.threads.split(",")}):
                    torch.set_num_threads(threads)
                    fns = {"vllm": make_vllm_run(), "seqkv_per_sequence": per_sequence, "seqkv_shared": shared}
                    load_before = os.getloadavg()[0]
                    med, best = interleaved(fns, args.repeats)
                    row = {"shape": shape, "context": ctx, "sharers": sharers, "shared_positions": ctx - BLOCK,
                           "threads": threads, **{f"{k}_ms": round(v, 4) for k, v in med.items()},
                           "shared_vs_vllm": round(med["vllm"] / med["seqkv_shared"], 3),
                           "shared_vs_per_sequence": round(med["seqkv_per_sequence"] / med["seqkv_shared"], 3),
                           "per_sequence_vs_vllm": round(med["vllm"] / med["seqkv_per_sequence"], 3),
                           "load_average_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
                    rows.append(row)
                    print(f"{shape:8s} ctx={ctx:6d} sharers={sharers:3d} threads={threads} vllm {med['vllm']:8.3f} ms "
                          f"per-seq {med['seqkv_per_sequence']:8.3f} ms shared {med['seqkv_shared']:8.3f} ms "
                          f"shared/vllm speedup {row['shared_vs_vllm']:.2f}x", flush=True)
    result = {"command": " ".join([Path(sys.executable).name, "-m", "benchmarks.cpu_decode_shared", *sys.argv[1:]]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info, "load_average_at_end": os.getloadavg(), "uptime_at_end": uptime(),
              "vllm_op": f"torch.ops._C.cpu_attention_with_kv_cache (bf16 cache, isa {isa})",
              "seqkv_op": f"torch.ops.seqkv.cpu_transform_decode_attention ({active_isa()})",
              "block_size": BLOCK, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
