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
    return (f"{platform.machine()}, {torch.get_num_threads()} cores ({model or 'CPU'}), "
            f"torch {torch.__version__}, fp32, no GPU")


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


def _long(records: list[dict], text: str | None = None) -> list[dict]:
    return [r for r in records if r.get("suite", "long") == "long" and r.get("path", "ruler") == "ruler"
            and (text is None or r["text"] == text)]


def _texts(records: list[dict]) -> list[str]:
    texts = []
    for r in records:
        if r.get("suite", "long") == "long" and r["text"] not in texts:
            texts.append(r["text"])
    return texts


def _text_name(text: str) -> str:
    path = Path(text)
    return f"{path.parent.name}/{path.name}"


def _buckets(r: dict) -> str:
    by = r.get("delta_ppl_pct_by_position") or {}
    return " / ".join(f"{v:+.1f}" for v in by.values()) or "-"


def quality_table(records: list[dict]) -> str:
    head = ("| codec | bits/elem | decode read bits/elem | transient B/token | x vs bf16 | ppl "
            "| Δppl % (± SE) | Δppl % by position (0-63 / 64-255 / 256-1023 / 1024+) | KL nats/token "
            "| attn rel err |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")
    rows = []
    for r in sorted(records, key=lambda r: -r["bits_per_element"]):
        rows.append(
            f"| {r['codec']} | {r['bits_per_element']:.3f} | {r.get('decode_read_bits_per_element', float('nan')):.2f} "
            f"| {r.get('transient_bytes_per_token', 0)} | {r['ratio_vs_bf16']:.2f} | {r['ppl']:.3f} "
            f"| {r['delta_ppl_pct']:+.2f} ± {r['delta_ppl_se_pct']:.2f} | {_buckets(r)} "
            f"| {r['kl']:.4f} | {r['attn_rel_err_mean']:.4f} |"
        )
    return head + "\n".join(rows) + "\n"


def chat_table(records: list[dict]) -> str:
    head = ("| codec | path | bits/elem at chat length | decode read bits/elem | Δppl % teacher-forced (± SE) "
            "| greedy answers | T=1 answers | KL nats/token | free-running greedy ppl ratio "
            "| free-running T=1 ppl ratio | greedy agreement |\n"
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")
    rows = []

    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    for r in sorted(records, key=lambda r: (r["path"], -r["bits_per_element"])):
        se = r.get("chat_delta_ppl_se_pct")
        rows.append(
            f"| {r['codec']} | {r['path']} | {r['bits_per_element']:.2f} | {r['decode_read_bits_per_element']:.2f} "
            f"| {r['chat_delta_ppl_pct']:+.2f}{'' if se is None else f' ± {se:.2f}'} "
            f"| {num(r.get('chat_greedy_delta_ppl_pct'), '+.2f')} | {num(r.get('chat_t1_delta_ppl_pct'), '+.2f')} "
            f"| {num(r.get('chat_kl'), '.4f')} | {num(r.get('free_greedy_ppl_ratio'), '.3f')} "
            f"| {num(r.get('free_t1_ppl_ratio'), '.3f')} | {num(r.get('greedy_agreement'), '.2f')} |")
    return head + "\n".join(rows) + "\n"


def vllm_long_table(records: list[dict]) -> str:
    head = ("| peer | text | bits/elem | ppl | Δppl % vs vllm:auto | Δppl % by position (0-63 / 64-255 / "
            "256-1023 / 1024+) | garbage |\n| --- | --- | ---: | ---: | ---: | ---: | --- |\n")
    rows = [f"| {r['codec']} | {_text_name(r['text'])} | {r['bits_per_element']:.2f} | {r['ppl']:.3f} "
            f"| {r['delta_ppl_pct']:+.2f} | {_buckets(r)} | {'yes' if r.get('garbage') else 'no'} |"
            for r in records]
    return head + "\n".join(rows) + "\n"


def side_by_side(records: list[dict]) -> str:
    """One row per codec: bits, decode read bits, long Δppl per text, chat figures."""
    texts = _texts([r for r in records if r.get("path", "ruler") == "ruler"])
    by = {}
    for r in records:
        by.setdefault(r["codec"], {})[(r.get("suite", "long"), r["text"])] = r
    head = ("| codec | bits/elem (long) | decode read bits/elem | "
            + " | ".join(f"long Δppl % {_text_name(t)}" for t in texts)
            + " | chat Δppl % (teacher-forced) | free-running greedy ppl ratio | greedy agreement |\n"
            + "| --- | ---: | ---: | " + " | ".join("---:" for _ in texts) + " | ---: | ---: | ---: |\n")
    rows = []
    for codec, parts in by.items():
        longs = [parts.get(("long", t)) for t in texts]
        first = next((x for x in longs if x), None)
        if first is None:
            continue
        chat = next((v for (suite, _), v in parts.items() if suite == "chat"), None)
        cells = [f"{x['delta_ppl_pct']:+.2f}" if x else "-" for x in longs]
        if chat:
            ratio = chat.get("free_greedy_ppl_ratio")
            cells += [f"{chat['chat_delta_ppl_pct']:+.2f}", "-" if ratio is None else f"{ratio:.3f}",
                      f"{chat['greedy_agreement']:.2f}"]
        else:
            cells += ["-", "-", "-"]
        name = codec + (" (default)" if first.get("default") else "")
        rows.append(f"| {name} | {first['bits_per_element']:.3f} "
                    f"| {first.get('decode_read_bits_per_element', float('nan')):.2f} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def quality_markdown(records: list[dict], seconds: float) -> str:
    first = records[0]
    ruler_long = _long(records)
    chat = [r for r in records if r.get("suite") == "chat"]
    vllm_long = [r for r in records if r.get("path") == "vllm" and r.get("suite") == "long"]
    parts = [
        f"Command: `{first['command']}`  \n"
        f"Machine: {machine()}. Date: {first['date']}. Wall time: {seconds / 60:.1f} min.  \n"
        f"Model `{first['model']}`. Raw figures: `benchmarks/quality.json`; plot: `benchmarks/quality.png` "
        "(long Δppl vs bits, chat Δppl vs bits, long Δppl vs decode read bits).\n",
        "Decode cost, from each codec's definition: *decode read bits/elem* is what one decode "
        "step reads from memory per cached element (one position, one layer, K or V), counting "
        "its own slot, any other layer's reconstruction it needs (float32) and table rows, "
        "averaged over layers; *transient B/token* is what is held outside the KV pages per "
        "cached token during a step (the cross-layer chain keeps two layers' float32 K and V). "
        "Fixed per-layer constants (means, bases, levels, token tables) are not in either.\n",
        "### Side by side\n\n" + side_by_side([r for r in records if r.get("path", "ruler") == "ruler"]),
    ]
    for text in _texts(ruler_long):
        rows = _long(records, text)
        r0 = rows[0]
        parts.append(
            f"### Long context: `{_text_name(text)}`\n\n"
            f"{r0['windows']} windows x {r0['context']} tokens = {r0['tokens']} evaluated tokens, "
            f"exact-cache ppl {r0['ppl_ref']:.3f}. Teacher-forced, fp32 compute; every layer's "
            "attention reads its cached past through the codec (encode -> decode) as a decode path "
            "would: coded before the codec's exact window, exact inside it and for sink tokens, own "
            "K/V exact. bits/elem is all-in (scales, zeros, norms, exact windows over the context). "
            "KL is KL(exact || coded) of the next-token distribution; attn rel err is "
            "||o_coded - o_exact|| / ||o_exact|| (mean over layers, last 256 queries of each window). "
            "± is a paired standard error over 256-token chunks.\n\n" + quality_table(rows))
    if chat:
        c0 = next(r for r in chat if r["path"] == "ruler") if any(r["path"] == "ruler" for r in chat) else chat[0]
        parts.append(
            "### Chat suite\n\n"
            f"`{Path(c0['text']).name}`: {c0['conversations']} conversations (48 single-turn, 12 "
            "multi-turn in the full suite), rendered with the model's chat template. The exact model "
            "(fp32, exact cache) writes the reference answers: greedy plus T=1 samples with fixed "
            f"seeds ({c0.get('answers_per_prompt', '?')} answers per prompt, up to the stop token, "
            f"{c0.get('answer_tokens', '?')} answer tokens; mean sequence {c0.get('mean_sequence_tokens', 0):.0f} "
            "tokens). *Teacher-forced*: Δppl and KL over the reference answers read through the "
            "codec (± paired SE over answers). *Free-running*: each codec writes its own answers "
            "(greedy; T=1 with the same seeds), scored by the exact model, as the ratio of their "
            "perplexity to that of the exact model's own answers; greedy agreement = mean fraction "
            "of the reference greedy answer matched before the first divergence. Path `ruler`: the "
            "ruler's fp32 forward; path `vllm`: the CPU engine (bf16 compute) against `vllm:auto` in "
            "the same run (its reference answers are still the exact model's; vLLM returns no full "
            "distributions, so no KL).\n\n" + chat_table(chat))
    if vllm_long:
        parts.append(
            "### vLLM's own caches through the engine\n\n"
            "Same windows through the real CPU engine (bf16 weights and compute, prompt "
            "log-probabilities: the serving path), each against `vllm:auto` in the same run. "
            "`garbage`: perplexity over 10x auto's (a dtype vLLM accepts but does not run correctly on CPU).\n\n"
            + vllm_long_table(vllm_long))
    return "\n".join(parts)


def pareto_plot(records: list[dict], path: Path, title: str) -> None:
    """Three panels of the ruler's records (see :func:`quality_plot`); kept as the old name."""
    quality_plot(records, path, title)


def quality_plot(records: list[dict], path: Path, title: str) -> None:
    """Panels: long Δppl vs bits (first text), chat Δppl vs bits, long Δppl vs decode read bits.
    Symlog y, every codec numbered (a key beside each panel), Pareto front drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    texts = _texts(_long(records))
    long_first = _long(records, texts[0]) if texts else []
    chat = [r for r in records if r.get("suite") == "chat" and r.get("path", "ruler") == "ruler"]
    panels = [(long_first, "bits_per_element", "delta_ppl_pct", "bits per KV element (all-in)",
               f"long context, {_text_name(texts[0]) if texts else ''}"),
              (chat, "bits_per_element", "chat_delta_ppl_pct", "bits per KV element at chat length",
               "chat suite, teacher-forced"),
              (long_first, "decode_read_bits_per_element", "delta_ppl_pct",
               "bits a decode step reads per cached element", "long context vs decode read cost")]
    panels = [p for p in panels if p[0]]
    fig, axes = plt.subplots(1, len(panels), figsize=(9 * len(panels), 6), squeeze=False)
    for ax, (rows, x_key, y_key, xlabel, subtitle) in zip(axes[0], panels):
        _panel(ax, rows, x_key, y_key, xlabel, subtitle)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _panel(ax, records: list[dict], x_key: str, y_key: str, xlabel: str, subtitle: str) -> None:
    points = sorted((r[x_key], r[y_key], r["codec"]) for r in records if r.get(y_key) is not None)
    front, best = [], float("inf")
    for x, delta, _ in points:
        if delta < best:
            front.append((x, delta))
            best = delta
    ours = [p for p in points if p[2].startswith("seqkv")]
    peers = [p for p in points if not p[2].startswith("seqkv")]
    for group, color, label in ((peers, "tab:blue", "baselines"), (ours, "tab:red", "seqkv presets")):
        if group:
            ax.scatter([p[0] for p in group], [p[1] for p in group], color=color, zorder=3, label=label)
    key = []
    for number, (x, delta, name) in enumerate(points, start=1):
        ax.annotate(str(number), (x, delta), textcoords="offset points", xytext=(4, 3), fontsize=7)
        key.append(f"{number:>2} {name}: {x:.2f}, {delta:+.1f} %")
    ax.text(1.02, 1.0, "\n".join(key), transform=ax.transAxes, va="top", fontsize=6, family="monospace")
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:gray", alpha=0.6,
            label="Pareto front")
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("Δ perplexity vs exact cache (%)")
    ax.set_title(subtitle, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
