"""Op-level CPU decode benchmark: seqkv's fused C++ decode over compressed pages vs the attention
op vLLM's own CPU backend runs (``torch.ops._C.cpu_attention_with_kv_cache``, called by
``vllm/v1/attention/backends/cpu_attn.py``) over a bf16 cache of the same shape.

One query token per sequence, every sequence ``ctx`` tokens long (own token included), block
size 128 for both, shuffled block tables, the same thread count for both, calls interleaved
(A, B, A, B, ...) in one process so that load from other processes hits both alike; medians
(and minima: the least disturbed call) of ``--repeats`` timed calls after warm-up. seqkv pages:
the default preset's format (``seqkv-f4``:
no cross-layer prediction, keys pre-RoPE in a RoPE-pair block-diagonal basis rotated from a rope
table in the kernel, keys 3.5 / values 4.5 bits per element, 64 bytes per token-head at D = 64).
SmolLM2 layer: the model's own cached seqkv-f4 calibration (layer ``--layer``), as the engine
builds its kernel params. Llama-8B-like layer (no such model here): an f4-like random but valid
transform with the same bit allocation (each component width of the SmolLM2 layer's head
``h % 3`` used twice, so the same width histogram and 3.5 / 4.5 bits), a random RoPE-pair key
basis and a random full value basis. Page bytes are random (every code is a valid level); the
kernel's work does not depend on them. ``--general-key-contexts`` adds rows with a general key
basis (not the default preset's path; off by default).

Run from the repository root:
    python -m benchmarks.cpu_decode            # writes benchmarks/cpu_decode.json
Shapes: SmolLM2-135M layer (Hq 9, Hkv 3, D 64), Llama-8B-like layer (Hq 32, Hkv 8, D 128);
contexts 1k/4k/16k/32k; batch 1/8/32; combinations whose bf16 cache exceeds --max-gb skipped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SHAPES = {"smollm2": (9, 3, 64), "llama8b": (32, 8, 128)}
ROPE_THETA = {"smollm2": 100000.0, "llama8b": 500000.0}  # SmolLM2's config; Llama-3's
BLOCK = 128


def shuffled_block_table(ctx: int, batch: int) -> torch.Tensor:
    """``[batch, ctx / BLOCK]`` int32: every sequence its own blocks, in a shuffled order."""
    blocks_per_seq = -(-ctx // BLOCK)
    gen = torch.Generator().manual_seed(ctx + batch)
    return torch.randperm(batch * blocks_per_seq, generator=gen).to(torch.int32).view(batch, -1)


def uptime() -> str:
    """``uptime``'s line (load averages over 1 / 5 / 15 min): contention from other processes."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


def f4_layouts(shape: str, kv_heads: int, dim: int, layer: int) -> dict:
    """``{"pair": SlotLayout}`` of the default preset's format for this layer shape (see the
    module docstring), plus ``"general"``: the same widths with an arbitrary key basis."""
    import seqkv_fixtures as fixtures
    from vllm_seqkv import calibrate
    from vllm_seqkv.codec.base import SlotLayout
    from vllm_seqkv.codec.presets import PRESETS

    calibration = calibrate.load_for_model(fixtures.smollm2_dir(), "seqkv-f4")
    key, value = PRESETS["seqkv-f4"].build(calibration).per_layer[layer]
    real = SlotLayout(key, value, 3, 64)
    if shape == "smollm2":
        return {"pair": real, "general": _with_widths(real.key.inner.transform.bits, real.value.inner.transform.bits,
                                                        pair_keys=False, seed=0)}

    def widths(bits):  # [3, 64] -> [kv_heads, dim]: every width twice, head h from head h % 3
        return bits.repeat_interleave(dim // 64, dim=1)[torch.arange(kv_heads) % bits.shape[0]]

    key_bits, value_bits = widths(key.inner.transform.bits), widths(value.inner.transform.bits)
    return {name: _with_widths(key_bits, value_bits, pair_keys=name == "pair", seed=0)
            for name in ("pair", "general")}


def _with_widths(key_bits, value_bits, pair_keys: bool, seed: int):
    """A random but valid TransformCodec K/V SlotLayout with the given component widths."""
    from tests.kernels.cpu_helpers import random_basis, random_levels
    from vllm_seqkv.codec.base import SlotLayout
    from vllm_seqkv.codec.transform import Transform, TransformCodec

    def transform(bits, pairs, gen):
        heads, dim = bits.shape
        levels = random_levels(bits, gen)
        return Transform.from_padded(torch.randn(heads, dim, generator=gen) * 0.5,
                                     random_basis(heads, dim, pairs, gen), bits.long().clone(), levels)

    gen = torch.Generator().manual_seed(seed)
    heads, dim = key_bits.shape
    return SlotLayout(TransformCodec(transform(key_bits, pair_keys, gen)),
                      TransformCodec(transform(value_bits, False, gen)), heads, dim)


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "logical_cpus": os.cpu_count(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "L2 cache", "L3 cache", "Core(s) per socket", "Socket(s)"):
                info[key.strip()] = value.strip()
    except OSError:
        pass
    try:
        info["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    info["uptime_at_start"] = uptime()
    return info


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def interleaved(fns: dict, repeats: int, warmup: int = 2, before=None) -> dict:
    """Medians and minima (ms) of ``repeats`` timed calls of each function, calls interleaved;
    ``before`` (untimed) runs ahead of every timed call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if before is not None:
                before()
            times[name].append(timed(fn))
    return ({name: statistics.median(t) for name, t in times.items()},
            {name: min(t) for name, t in times.items()})


def cache_evictor(nbytes: int):
    """A function that reads ``nbytes`` of its own (clean lines, as the model's weights are) so
    that the next call meets its cache, tables and code out of the CPU's caches. Between two
    calls of one layer in a decode step the other layers' weights and caches stream through
    (SmolLM2: ~270 MB of bf16 weights per step), but measured through the engine both ops run
    much nearer their warm times than after this read (BENCHMARKS.md, "Warm and cold"): an
    upper bound of what cache misses cost, not the engine's regime."""
    buffer = torch.ones(nbytes // 4, dtype=torch.float32)

    def evict():
        buffer.sum()

    return evict


def vllm_case(q_heads, kv_heads, dim, ctx, batch, table):
    import vllm._custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    num_blocks = int(table.max()) + 1
    cache = torch.randn(num_blocks, kv_heads, 2 * BLOCK, dim, dtype=torch.bfloat16)
    key_cache, value_cache = cache.chunk(2, dim=2)
    query = torch.randn(batch, q_heads, dim, dtype=torch.bfloat16)
    out = torch.empty_like(query)
    starts = torch.arange(batch + 1, dtype=torch.int32)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32)
    isa = _get_attn_isa(torch.bfloat16, BLOCK, dim, "auto")

    def make_run():
        """The op with its scheduler metadata, which fixes the thread count: build after
        torch.set_num_threads, as vLLM's metadata builder does for every batch."""
        metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=batch, num_heads=q_heads, num_kv_heads=kv_heads, head_dim=dim, seq_lens=seq_lens,
            dtype=torch.bfloat16, query_start_loc=starts, causal=True, sliding_window_size=-1, isa=isa,
            enable_kv_split=True)

        def run():
            ops.cpu_attention_with_kv_cache(
                query=query, key_cache=key_cache, value_cache=value_cache, output=out, query_start_loc=starts,
                seq_lens=seq_lens, scale=dim ** -0.5, causal=True, alibi_slopes=None, sliding_window=-1,
                block_table=table, softcap=0.0, scheduler_metadata=metadata, s_aux=None)

        return run

    return make_run, cache.numel() * 2, isa


def seqkv_case(q_heads, kv_heads, dim, ctx, batch, table, layout, rope_theta):
    from vllm_seqkv.kernels.cpu_ops import transform_decode_attention_cpp
    from vllm_seqkv.kernels.params import rope_cache, transform_layer_params

    params = transform_layer_params(layout)
    num_blocks = int(table.max()) + 1
    pages = torch.randint(0, 256, (num_blocks, kv_heads, BLOCK, layout.slot_bytes), dtype=torch.uint8)
    query = torch.randn(batch, q_heads, dim, dtype=torch.bfloat16)
    own = torch.randn(batch, kv_heads, dim, dtype=torch.bfloat16)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32)
    rope = rope_cache(ctx, dim, rope_theta)

    def run():
        transform_decode_attention_cpp(query, own, own, pages, table, seq_lens, params, dim ** -0.5, rope=rope)

    return run, pages.numel()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="smollm2,llama8b")
    parser.add_argument("--contexts", default="1024,4096,16384,32768")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}",
                        help="thread counts (comma-separated); both ops run with the same count")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--max-gb", type=float, default=8.0, help="skip combos whose bf16 cache exceeds this")
    parser.add_argument("--general-key-contexts", default="",
                        help="contexts at which the general (non pair-diagonal) key path is also timed (batch 1)")
    parser.add_argument("--layer", type=int, default=15, help="SmolLM2 layer whose seqkv-f4 calibration is used")
    parser.add_argument("--skip", default="", help="shape:context:batch cells not run (comma-separated)")
    parser.add_argument("--cold", type=int, default=0, metavar="MIB",
                        help="read this many MiB (untimed) before every timed call, so that both ops meet their "
                             "caches and tables out of the CPU's caches (0: warm, the default)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "cpu_decode.json"))
    args = parser.parse_args(argv)

    from vllm_seqkv.kernels.cpu_ops import active_isa, load_cpu_ops, load_error

    if not load_cpu_ops():
        sys.exit(f"vllm_seqkv._cpu is not built ({load_error()}): run bash scripts/setup.sh")
    machine_info = machine()
    rows = []
    skipped = []
    skip = set(filter(None, args.skip.split(",")))
    thread_counts = sorted({int(t) for t in args.threads.split(",")})
    before = cache_evictor(args.cold << 20) if args.cold else None
    general_ctx = {int(c) for c in args.general_key_contexts.split(",") if c}
    for shape in args.shapes.split(","):
        q_heads, kv_heads, dim = SHAPES[shape]
        layouts = f4_layouts(shape, kv_heads, dim, args.layer)
        rope_theta = ROPE_THETA[shape]
        for ctx in map(int, args.contexts.split(",")):
            for batch in map(int, args.batches.split(",")):
                bf16_bytes = batch * ctx * kv_heads * dim * 2 * 2
                if bf16_bytes > args.max_gb * 2**30:
                    print(f"skip {shape} ctx={ctx} batch={batch}: bf16 cache {bf16_bytes / 2**30:.1f} GiB", flush=True)
                    continue
                if f"{shape}:{ctx}:{batch}" in skip:
                    print(f"skip {shape} ctx={ctx} batch={batch}: --skip", flush=True)
                    skipped.append(f"{shape}:{ctx}:{batch}")
                    continue
                table = shuffled_block_table(ctx, batch)
                make_vllm_run, vllm_bytes, vllm_isa = vllm_case(q_heads, kv_heads, dim, ctx, batch, table)
                keys = ["pair"] + (["general"] if batch == 1 and ctx in general_ctx else [])
                fns = {"vllm": None}
                seqkv_bytes = 0
                for key in keys:
                    fns[key], seqkv_bytes = seqkv_case(q_heads, kv_heads, dim, ctx, batch, table, layouts[key],
                                                          rope_theta)
                repeats = args.repeats if bf16_bytes < 2**30 else max(5, args.repeats // 2)
                for threads in thread_counts:
                    torch.set_num_threads(threads)
                    fns["vllm"] = make_vllm_run()
                    load_before = os.getloadavg()
                    med, best = interleaved(fns, repeats, before=before)
                    load_after = os.getloadavg()
                    for key in keys:
                        row = {"shape": shape, "q_heads": q_heads, "kv_heads": kv_heads, "head_dim": dim,
                               "context": ctx, "batch": batch, "threads": threads, "key_path": key,
                               "vllm_ms": round(med["vllm"], 4), "seqkv_ms": round(med[key], 4),
                               "speedup_vs_vllm": round(med["vllm"] / med[key], 3),
                               "vllm_min_ms": round(best["vllm"], 4), "seqkv_min_ms": round(best[key], 4),
                               "speedup_of_min": round(best["vllm"] / best[key], 3), "vllm_cache_bytes": vllm_bytes,
                               "seqkv_cache_bytes": seqkv_bytes, "repeats": repeats, "cold_mib": args.cold,
                               "load_average_1min_before_after": [round(load_before[0], 2), round(load_after[0], 2)]}
                        rows.append(row)
                        print(f"{shape:8s} ctx={ctx:6d} batch={batch:3d} threads={threads} key={key:7s} "
                              f"vllm {med['vllm']:9.3f} ms  seqkv {med[key]:9.3f} ms  "
                              f"speedup {row['speedup_vs_vllm']:.2f}x", flush=True)
                del fns, make_vllm_run
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info,
        "threads": thread_counts,
        "load_average_at_end": os.getloadavg(),
        "uptime_at_end": uptime(),
        "skipped_cells": skipped,
        "vllm_op": "torch.ops._C.cpu_attention_with_kv_cache (bf16 cache, isa %s)" % vllm_isa,
        "seqkv_op": f"torch.ops.seqkv.cpu_transform_decode_attention ({active_isa()})",
        "block_size": BLOCK,
        "caches": (f"cold: {args.cold} MiB read before every timed call" if args.cold
                   else "warm: calls back to back, a cache that fits the CPU's caches stays there"),
        "format": (f"seqkv-f4 (default preset): SmolLM2 layer {args.layer}'s cached calibration; Llama-8B-like: "
                   "random valid transform with the SmolLM2 layer's f4 component widths (each twice, head h from "
                   "head h % 3), K 3.5 / V 4.5 bits per element, pre-RoPE keys in a RoPE-pair basis"),
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
