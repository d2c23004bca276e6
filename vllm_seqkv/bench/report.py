"""Outputs of the ruler: JSON, a Markdown section of BENCHMARKS.md, the Pareto plot."""

from __future__ import annotations

import datetime
import json
import platform
import shlex
import sys
from pathlib import Path

import torch

QUALITY_SECTION = "## Quality (ruler)"
ENTROPY_SECTION = "## The paper's claims (measured)"


def machine() -> str:
    """E.g. ``x86_64, 2 cores (Intel(R) Xeon(R) Processor), torch 2.13.0+cpu``; no GPU used."""
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{platform.machine()}, {torch.get_num_threads()} cores ({model or 'CPU'}), torch {torch.__version__}, fp32, no GPU"


def run_header(module: str, argv: list[str] | None) -> dict:
    """``date``, ``command`` (``python -m MODULE ARGS``; ``argv`` None: this process's) and
    ``machine`` (without the torch part) of a benchmark record."""
    args = shlex.join(argv if argv is not None else sys.argv[1:])
    return {"date": datetime.date.today().isoformat(),
            "command": f"python -m {module} {args}".strip(),
            "machine": machine().split(", torch")[0]}


def write_json(path: Path, payload) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def replace_section(path: Path, heading: str, body: str) -> None:
    """Replace the Markdown section ``heading`` (up to the next ``## `` heading) of ``path``.

    Appends the section when absent; creates the file with a title when missing. Other
    sections are left byte-for-byte as they are.
    """
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    new = [f"{heading}\n", "\n", body.rstrip("\n") + "\n", "\n"]
    start = next((i for i, line in enumerate(lines) if line.rstrip("\n") == heading), None)
    if start is None:
        if lines and lines[-1].strip():
            lines.append("\n")
        lines += new
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = new
    path.write_text("".join(lines).rstrip("\n") + "\n")


def quality_table(records: list[dict]) -> str:
    head = ("| codec | bits/elem | bytes/token | x vs bf16 | ppl | Δppl % (± SE) | KL nats/token | attn rel err |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")
    rows = []
    for r in sorted(records, key=lambda r: -r["bits_per_element"]):
        rows.append(
            f"| {r['codec']} | {r['bits_per_element']:.3f} | {r['bytes_per_token']:.0f} | "
            f"{r['ratio_vs_bf16']:.2f} | {r['ppl']:.3f} | {r['delta_ppl_pct']:+.2f} ± {r['delta_ppl_se_pct']:.2f} | "
            f"{r['kl']:.4f} | {r['attn_rel_err_mean']:.4f} |"
        )
    return head + "\n".join(rows) + "\n"


def quality_markdown(records: list[dict], seconds: float) -> str:
    first = records[0]
    return (
        f"Command: `{first['command']}`  \n"
        f"Machine: {machine()}. Date: {first['date']}. Wall time: {seconds / 60:.1f} min.  \n"
        f"Model `{first['model']}`, text `{Path(first['text']).name}`, {first['windows']} windows x "
        f"{first['context']} tokens = {first['tokens']} evaluated tokens, exact-cache ppl "
        f"{first['ppl_ref']:.3f}.\n\n"
        "Teacher-forced, fp32 compute; every layer's attention reads its cached past through the "
        "codec (encode -> decode) as a decode path would: coded before the codec's exact window, "
        "exact inside it and for sink tokens, own K/V exact. bits/elem is all-in (scales, zeros, "
        "norms, exact windows over the context). KL is KL(exact || coded) of the next-token "
        "distribution; attn rel err is ||o_coded - o_exact|| / ||o_exact|| of the attention output "
        "(mean over layers, last 256 queries of each window). ± is a paired standard error over "
        "256-token chunks. Raw figures: `benchmarks/quality.json`; plot: `benchmarks/quality.png`.\n\n"
        + quality_table(records)
    )


def pareto_plot(records: list[dict], path: Path, title: str) -> None:
    """Bits/element (x) vs Δppl % (symlog y), every codec labelled, Pareto front drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    points = sorted((r["bits_per_element"], r["delta_ppl_pct"], r["codec"]) for r in records)
    front, best = [], float("inf")
    for bits, delta, _ in points:
        if delta < best:
            front.append((bits, delta))
            best = delta
    fig, ax = plt.subplots(figsize=(11, 6))
    ours = [p for p in points if p[2].startswith("seqkv")]
    peers = [p for p in points if not p[2].startswith("seqkv")]
    for group, color, label in ((peers, "tab:blue", "baselines"), (ours, "tab:red", "seqkv presets")):
        if group:
            ax.scatter([p[0] for p in group], [p[1] for p in group], color=color, zorder=3, label=label)
    # points are numbered (labels of close points would overlap); the key lists the numbers
    key = []
    for number, (bits, delta, name) in enumerate(points, start=1):
        ax.annotate(str(number), (bits, delta), textcoords="offset points", xytext=(4, 3), fontsize=7)
        key.append(f"{number:>2} {name}: {bits:.2f} b, {delta:+.1f} %")
    ax.text(1.02, 1.0, "\n".join(key), transform=ax.transAxes, va="top", fontsize=7, family="monospace")
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:gray",
            alpha=0.6, label="Pareto front")
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_xlabel("bits per KV element (all-in)")
    ax.set_ylabel("Δ perplexity vs exact cache (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
