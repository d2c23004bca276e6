"""Where the op-level CPU decode time goes (issue 18's profile of the missed op targets).

    python -m benchmarks.cpu_decode_profile      # writes benchmarks/cpu_decode_profile.json

Three measurements, one thread unless said, calls interleaved and medians as in
``benchmarks/cpu_decode.py`` (whose cases this reuses):

1. Memory bandwidth of this machine: a 1 GiB float32 ``copy_`` (read + write counted) and a
   read-only ``sum``, at 1 and 2 threads; next to it the bytes each op reads per call divided by
   its time (its achieved GB/s), at a few cells of the op benchmark.
2. Split by GQA group size: the same layer (KV heads, head size, context, batch) timed with
   ``G`` = 1, 2, 4, 8 query heads per KV head. Work that is done once per cached token-head
   (reading and unpacking its codes, rebuilding the key pair) does not grow with ``G``; scoring
   and the value level sums grow linearly. A least-squares line ``t(G) = a + b G`` gives ``a``
   (per token-head: read + unpack + key rebuild) and ``b`` (per query head: score + softmax +
   value accumulate); the same fit for vLLM's bf16 op.
3. Split by code width: the seqkv-f4 widths (keys 3.5 / values 4.5 bits, components of 0-8 bits)
   against a format with the same slot size but narrow components only (keys 3 and 4 bits,
   values 4 and 5: one register permute per component, no two-table lookups (6 bits) or
   gathers (7-8 bits)), and the earlier
   seqkv-3-nox-like format (K 2.5 / V 3.5, 48 bytes per token-head at D = 64): what the wide
   components of the f4 allocation cost.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.cpu_decode import (  # noqa: E402
    BLOCK,
    _with_widths,
    f4_layouts,
    interleaved,
    machine,
    seqkv_case,
    uptime,
    vllm_case,
)


def bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> dict:
    """GB/s of a float32 copy (bytes read + written) and of a read-only sum, ``threads`` threads."""
    torch.set_num_threads(threads)
    n = int(gib * 2**30) // 4
    src = torch.ones(n)
    dst = torch.empty(n)
    dst.copy_(src)
    copy_s, sum_s = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        copy_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        src.sum()
        sum_s.append(time.perf_counter() - t0)
    return {"threads": threads, "copy_GBps": round(2 * n * 4 / statistics.median(copy_s) / 1e9, 2),
            "read_sum_GBps": round(n * 4 / statistics.median(sum_s) / 1e9, 2)}


def table(batch: int, ctx: int, seed: int = 0) -> torch.Tensor:
    blocks = -(-ctx // BLOCK)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(batch * blocks, generator=gen).to(torch.int32).view(batch, -1)


def time_pair(q_heads, kv_heads, dim, ctx, batch, layouts: dict, repeats: int) -> dict:
    """Medians (ms) of vLLM's bf16 op and of seqkv with each layout, interleaved, 1 thread."""
    torch.set_num_threads(1)
    tab = table(batch, ctx)
    make_vllm, vllm_bytes, _ = vllm_case(q_heads, kv_heads, dim, ctx, batch, tab)
    fns, nbytes = {"vllm": make_vllm()}, {"vllm": vllm_bytes}
    for name, layout in layouts.items():
        fns[name], nbytes[name] = seqkv_case(q_heads, kv_heads, dim, ctx, batch, tab, layout, 100000.0)
    med, _ = interleaved(fns, repeats)
    return {name: {"ms": round(med[name], 4), "bytes": nbytes[name],
                   "GBps": round(nbytes[name] / med[name] / 1e6, 2)} for name in fns}


def fit_line(xs, ys) -> tuple[float, float]:
    """Least squares ``y = a + b x``."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "cpu_decode_profile.json"))
    args = parser.parse_args(argv)
    record = {"command": "python -m benchmarks.cpu_decode_profile",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine()}
    record["bandwidth"] = [bandwidth(t) for t in (1, 2)]
    print(record["bandwidth"], flush=True)

    cells = [("smollm2", 3, 64, 4096, 1), ("smollm2", 3, 64, 16384, 8), ("llama8b", 8, 128, 16384, 1),
             ("llama8b", 8, 128, 4096, 8)]
    by_group, by_width = [], []
    for shape, kv_heads, dim, ctx, batch in cells:
        f4 = f4_layouts(shape, kv_heads, dim, 15)["pair"]
        times = {}
        for group in (1, 2, 4, 8):
            times[group] = time_pair(kv_heads * group, kv_heads, dim, ctx, batch, {"seqkv": f4}, args.repeats)
        token_heads = batch * (ctx - 1) * kv_heads
        row = {"shape": shape, "kv_heads": kv_heads, "head_dim": dim, "context": ctx, "batch": batch,
               "times": {g: t for g, t in times.items()}}
        for op in ("vllm", "seqkv"):
            a, b = fit_line(list(times), [times[g][op]["ms"] for g in times])
            row[f"{op}_ns_per_token_head"] = round(a * 1e6 / token_heads, 2)
            row[f"{op}_ns_per_token_query_head"] = round(b * 1e6 / token_heads, 2)
        by_group.append(row)
        print(json.dumps(row), flush=True)

        heads = kv_heads
        key_bits = f4.key.inner.transform.bits if hasattr(f4.key, "inner") else f4.key.transform.bits
        value_bits = f4.value.inner.transform.bits if hasattr(f4.value, "inner") else f4.value.transform.bits
        layouts = {
            "f4_widths": f4,
            "same_bytes_narrow": _with_widths(
                torch.tensor([3, 4]).repeat(heads, dim // 2), torch.tensor([4, 5]).repeat(heads, dim // 2),
                pair_keys=True, seed=1),
            "nox_like_2.5_3.5": _nox_like(heads, dim),
        }
        widths = time_pair(heads * (3 if shape == "smollm2" else 4), heads, dim, ctx, batch, layouts, args.repeats)
        width_row = {"shape": shape, "context": ctx, "batch": batch, "times": widths,
                     "f4_key_width_histogram": torch.bincount(key_bits.flatten(), minlength=9).tolist(),
                     "f4_value_width_histogram": torch.bincount(value_bits.flatten(), minlength=9).tolist()}
        by_width.append(width_row)
        print(json.dumps(width_row), flush=True)
    record.update({"by_group": by_group, "by_width": by_width, "uptime_at_start": record["machine"]["uptime_at_start"],
                   "uptime_at_end": uptime()})
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


def _nox_like(heads: int, dim: int):
    from tests.kernels.cpu_helpers import random_layout

    return random_layout(heads, dim, 2.5, 3.5, pair_keys=True, seed=0)


if __name__ == "__main__":
    main()
