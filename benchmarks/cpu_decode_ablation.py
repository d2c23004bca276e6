"""Where the fused CPU decode's time goes, by ablation: the op rebuilt without one part at a time.

Each variant is a copy of this tree (setup.py, csrc/, vllm_seqkv/, benchmarks/, seqkv_fixtures/,
tests/) in a temporary directory, built with ``SEQKV_CPU_CXXFLAGS=-DSEQKV_ABLATE_<PART>`` (see the
``kAblate*`` flags in csrc/cpu/transform_cpu_kernels.h): the part is skipped, so the variant's
results are garbage and only its time is read. Parts: ``scores`` (pass 1's key reads, RoPE-pair
rebuild and scores), ``values`` (the value pass), ``transpose`` (the 16 x 16 word transposes of
every tile: what a word-major page layout would save), ``page_reads`` (pass 1's slot addressing,
word loads and transposes: the tiles' scratch is left stale), ``head_fmas`` (the value pass's
multiply-adds of every query head but one: whether they bound it). ``base`` is the unablated op.

Each variant is measured in its own process, as ``benchmarks.cpu_decode`` measures a cell: the
seqkv op (default preset's format, seqkv-f4) and vLLM's CPU attention over a bf16 cache of the
same shape, calls interleaved, ``--repeats`` timed calls, medians. Variants run in turn, the whole
round ``--rounds`` times (the machine's state drifts between processes; vLLM's time in each
process is the yardstick). Per round and cell the variant's time is read as a ratio to vLLM's
in the same process; the part's share of the op is ``1 - variant / base`` of those ratios'
medians over rounds (the ms columns: medians over rounds).

Run from the repository root (about 30 s per variant and round, plus ~40 s per build):
    taskset -c 1 python -m benchmarks.cpu_decode_ablation   # writes benchmarks/cpu_decode_ablation.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARTS = {"base": "", "scores": "-DSEQKV_ABLATE_SCORES", "values": "-DSEQKV_ABLATE_VALUES",
         "transpose": "-DSEQKV_ABLATE_TRANSPOSE", "page_reads": "-DSEQKV_ABLATE_PAGE_READS",
         "head_fmas": "-DSEQKV_ABLATE_HEAD_FMAS"}
TREE = ("setup.py", "pyproject.toml", "csrc", "vllm_seqkv", "benchmarks", "seqkv_fixtures", "tests")


def build_variant(part: str, into: Path, flags: str | None = None) -> Path:
    """A copy of the tree with the CPU extension built for ``part`` (with ``flags`` instead of
    ``PARTS[part]`` when given); returns its root."""
    root = into / part
    root.mkdir(parents=True)
    for name in TREE:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.so", "build"))
        elif src.exists():
            shutil.copy2(src, root / name)
    env = dict(os.environ, SEQKV_CPU_CXXFLAGS=PARTS[part] if flags is None else flags, SEQKV_NO_CUDA="1")
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=root, env=env,
                           capture_output=True, text=True)
    if build.returncode != 0 or not list((root / "vllm_seqkv").glob("_cpu*.so")):
        raise RuntimeError(f"the {part} variant's vllm_seqkv._cpu did not build:\n{build.stderr[-3000:]}")
    return root


def measure(cells: list[str], repeats: int) -> list[dict]:
    """Time each cell (shape:context:batch) with the vllm_seqkv this process imports, 1 thread."""
    import torch

    import vllm_seqkv
    from benchmarks import cpu_decode as cd
    from vllm_seqkv.kernels import cpu_ops

    if not Path(vllm_seqkv.__file__).resolve().is_relative_to(Path.cwd().resolve()):
        raise RuntimeError(f"measuring {vllm_seqkv.__file__}, not the variant built in {Path.cwd()}")

    torch.set_num_threads(1)
    cpu_ops.load_cpu_ops()
    rows = []
    for cell in cells:
        shape, ctx, batch = cell.split(":")
        ctx, batch = int(ctx), int(batch)
        q_heads, kv_heads, dim = cd.SHAPES[shape]
        layout = cd.f4_layouts(shape, kv_heads, dim, 15)["pair"]
        table = cd.shuffled_block_table(ctx, batch)
        make_vllm, _, _ = cd.vllm_case(q_heads, kv_heads, dim, ctx, batch, table)
        seqkv, _ = cd.seqkv_case(q_heads, kv_heads, dim, ctx, batch, table, layout, cd.ROPE_THETA[shape])
        med, low = cd.interleaved({"vllm": make_vllm(), "seqkv": seqkv}, repeats, warmup=3)
        rows.append({"cell": cell, "vllm_ms": med["vllm"], "seqkv_ms": med["seqkv"],
                     "vllm_min_ms": low["vllm"], "seqkv_min_ms": low["seqkv"]})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--cells", default="smollm2:4096:1,smollm2:16384:1,llama8b:4096:1")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "cpu_decode_ablation.json"))
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # child process
    args = parser.parse_args(argv)
    cells = args.cells.split(",")
    if args.measure:
        print(json.dumps(measure(cells, args.repeats)))
        return
    from benchmarks.cpu_decode import machine, uptime

    parts = args.parts.split(",")
    if "base" not in parts:
        parts.insert(0, "base")
    info = machine()
    runs: dict[str, list] = {part: [] for part in parts}
    with tempfile.TemporaryDirectory(prefix="seqkv-ablation-") as tmp:
        roots = {part: build_variant(part, Path(tmp)) for part in parts}
        for round_ in range(args.rounds):
            for part in parts:
                env = dict(os.environ, PYTHONPATH=str(roots[part]))
                child = subprocess.run(
                    [sys.executable, "-m", "benchmarks.cpu_decode_ablation", "--measure", "--cells", args.cells,
                     "--repeats", str(args.repeats)], cwd=roots[part], env=env, capture_output=True, text=True)
                if child.returncode != 0:
                    raise RuntimeError(f"measuring the {part} variant failed:\n{child.stderr[-3000:]}")
                rows = json.loads(child.stdout.strip().splitlines()[-1])
                runs[part].append(rows)
                print(f"round {round_} {part}: " + ", ".join(f"{r['cell']} {r['seqkv_ms']:.3f} "
                                                             f"(vLLM {r['vllm_ms']:.3f})" for r in rows), flush=True)
    summary = []
    for i, cell in enumerate(cells):
        def relative(part):  # seqkv / vLLM in the same process, median over rounds
            return statistics.median(rows[i]["seqkv_ms"] / rows[i]["vllm_ms"] for rows in runs[part])

        base = relative("base")
        for part in parts:
            seqkv = statistics.median(rows[i]["seqkv_ms"] for rows in runs[part])
            vllm = statistics.median(rows[i]["vllm_ms"] for rows in runs[part])
            summary.append({"cell": cell, "part": part, "seqkv_ms": round(seqkv, 4), "vllm_ms": round(vllm, 4),
                            "seqkv_over_vllm": round(relative(part), 3),
                            "share_of_op": None if part == "base" else round(1 - relative(part) / base, 3)})
    pinned = sorted(os.sched_getaffinity(0))
    taskset = f"taskset -c {','.join(map(str, pinned))} " if len(pinned) < os.cpu_count() else ""
    result = {"command": f"{taskset}python -m benchmarks.cpu_decode_ablation " + " ".join(argv or sys.argv[1:]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": info, "uptime_at_end": uptime(), "threads": 1, "repeats": args.repeats,
              "rounds": args.rounds, "summary": summary, "runs": runs}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for row in summary:
        share = "" if row["share_of_op"] is None else f"  share {row['share_of_op']:+.0%}"
        print(f"{row['cell']:18s} {row['part']:10s} seqkv {row['seqkv_ms']:.3f} ms  vLLM {row['vllm_ms']:.3f} ms  "
              f"seqkv/vLLM {row['seqkv_over_vllm']:.2f}{share}")


if __name__ == "__main__":
    main()
