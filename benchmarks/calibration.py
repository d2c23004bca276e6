"""Calibration cost through vLLM and robustness to the calibration domain.

    python -m benchmarks.calibration [--models tiny,smollm2] [--json benchmarks/calibration.json]

Per model:
- ``seconds`` / ``peak_rss_bytes``: ``python -m vllm_seqkv.calibrate MODEL --no-cold-prior``
  (default preset, general set, vLLM capture) in a fresh cache folder, wall time and the peak
  of the summed RSS of its process tree (engine processes included), sampled every 0.2 s;
  the load average before and after is recorded (these cores are shared).
- ``robustness``: Δppl of the default preset calibrated on the general set vs on the evaluation
  domain (the docs train split, fitted the same way), evaluated by the ruler's long suite on
  the docs test split and the English prose test split, and teacher-forced on the exact model's
  greedy answers to the first ``--chat-prompts`` conversations of the chat suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil


def timed_calibration(model_dir: Path, home: Path, text: Path | None = None) -> dict:
    """Run the calibration CLI in a subprocess; wall seconds, peak tree RSS, file path."""
    command = [sys.executable, "-m", "vllm_seqkv.calibrate", str(model_dir), "--no-cold-prior"]
    if text is not None:
        command += ["--text", str(text)]
    env = {**os.environ, "SEQKV_HOME": str(home), "PYTHONPATH": os.pathsep.join(sys.path)}
    load_before = os.getloadavg()
    started = time.monotonic()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    peak = [0]

    def sample():
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    seconds = time.monotonic() - started
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"calibration failed (exit {proc.returncode}): {shlex.join(command)}")
    return {"path": out.strip().splitlines()[-1], "seconds": round(seconds, 1), "peak_rss_bytes": peak[0],
            "niceness": os.nice(0), "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()]}


def robustness(model_dir: Path, preset: str, calibrations: dict[str, str], context: int, tokens: int,
               chat_prompts: int, command: str) -> list[dict]:
    import seqkv_fixtures as fixtures
    from vllm_seqkv import calibrate
    from benchmarks import chat
    from benchmarks.model import LlamaForward
    from benchmarks.quality import QualitySettings, _long_suite
    from vllm_seqkv.codec import make_codec

    model = LlamaForward(model_dir)
    codecs = {name: make_codec(preset, calibrate.load(Path(path), preset))
              for name, path in calibrations.items()}
    out = []
    for label, text in (("docs-test", fixtures.corpus_path("test")), ("prose-test", fixtures.prose_path("test"))):
        settings = QualitySettings(model_dir=model_dir, text=text, calib_text=Path("-"), context=context,
                                   tokens=tokens, codecs=list(codecs), calib_tokens=calibrate.DEFAULT_TOKENS,
                                   command=command)
        for record in _long_suite(model, codecs, text, settings):
            out.append({"calibrated_on": record["codec"], "evaluated_on": label,
                        "delta_ppl_pct": round(record["delta_ppl_pct"], 3),
                        "delta_ppl_se_pct": round(record.get("delta_ppl_se_pct", float("nan")), 3),
                        "tokens": record.get("tokens", tokens)})
    state = chat.prepare(model, model_dir, chat.ChatSettings(max_new_tokens=64, samples=0, prompts=chat_prompts))
    pooled, _ = chat.teacher_forced(model, state["reference"], codecs)
    for name in codecs:
        delta, se = chat.delta_pct(pooled[name], pooled["exact"])
        out.append({"calibrated_on": name, "evaluated_on": "chat-answers", "delta_ppl_pct": round(delta, 3),
                    "delta_ppl_se_pct": round(se, 3), "tokens": pooled["exact"].tokens})
    return out


SCALING = """How it scales (a formula, not a measurement beyond the models above): memory = the engine
(weights in the capture dtype + `kv_cache_memory_bytes` for one chunk of 8 windows of 512
tokens + ~1 GB of torch/vLLM per process) + the captured K/V held by the front-end,
`T x L x H_kv x D x 2 x b` bytes (T = 24,576 tokens, b = 4 for float32 on CPU, 2 for bf16 on
GPU), plus one layer converted to float32 during the fit. For Llama-3.1-8B (L 32, H_kv 8,
D 128) in bf16 on a GPU that is 3.2 GB of host memory for the capture (16 GB of weights stay
on the device). Time = engine start + the forward of T tokens (2 x parameters x T FLOPs on
the device) + the fit on the host, proportional to L x H_kv x T x D (covariances, per-component
quantizers) plus L x H_kv x D^3 (eigenbases).
"""


def markdown_section(recs: list[dict]) -> str:
    """The BENCHMARKS.md section of these records."""
    commands = ", ".join(f"`{c}`" for c in sorted({r["command"] for r in recs}))
    lines = [
        "## Calibration", "",
        f"Command: {commands}  ",
        "Machine: x86_64, 2 cores shared with other jobs (load average recorded per run). "
        f"Date: {recs[0]['date']}.", "",
        "Calibration through vLLM's CPU engine (`python -m vllm_seqkv.calibrate MODEL --no-cold-prior`, "
        "default preset, 24,576 tokens of the shipped general set, float32 capture) in a fresh cache "
        "folder: wall time and peak RSS summed over the process tree (front-end + engine process), "
        "sampled every 0.2 s. Raw figures: `benchmarks/calibration.json` (each model's record from its "
        "own run: the command and date are in it).", "",
        "| model | layers x KV heads x head_dim | seconds | peak RSS (GiB) | load average (1 min) before / after |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for r in recs:
        shape = r["shape"]
        note = " (a second fit ran alongside for part of it)" if r.get("concurrent_fits", 1) > 1 else ""
        note += f" (at nice {r['niceness']}, beside other work)" if r.get("niceness", 0) > 0 else ""
        lines.append(f"| {r['model']}{note} | {shape['num_hidden_layers']} x {shape['num_key_value_heads']} x "
                     f"{shape['head_dim']} | {r['seconds']:.0f} | {r['peak_rss_bytes'] / 2**30:.2f} | "
                     f"{r['load_average_before'][0]} / {r['load_average_after'][0]} |")
    lines += [
        "",
        "Robustness (Δppl % of the default preset vs the exact model; ± paired standard error): "
        "calibrated on the general set vs on the evaluation domain (Python docs train split), "
        "evaluated on the docs test split and Jane Austen (ruler's long suite, one 2048-token window "
        "each) and on the exact model's greedy answers to the first chat-suite conversations "
        "(teacher-forced). The tiny model was trained on the docs train split alone, so general text "
        "is foreign to it; the figure that matters for users is SmolLM2's.", "",
        "| model | evaluated on | calibrated on general | calibrated on docs train | gap (points) "
        "| general / docs-train |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in recs:
        by = {(x["calibrated_on"], x["evaluated_on"]): x for x in r["robustness"]}
        for evaluated in ("docs-test", "prose-test", "chat-answers"):
            if ("general", evaluated) not in by:
                continue
            g, d = by[("general", evaluated)], by[("docs-train", evaluated)]
            gd, dd = g["delta_ppl_pct"], d["delta_ppl_pct"]
            ratio = f"{gd / dd:.2f}" if gd > 0 and dd > 0 else "n/a (a Δ ≤ 0)"
            lines.append(f"| {r['model']} | {evaluated} ({g['tokens']} tokens) "
                         f"| {gd:+.2f} ± {g['delta_ppl_se_pct']:.2f} | {dd:+.2f} ± {d['delta_ppl_se_pct']:.2f} "
                         f"| {gd - dd:+.2f} | {ratio} |")
    lines += ["", *SCALING.splitlines(), "", *fit_speed_lines(FIT_SPEED_JSON)]
    return "\n".join(lines) + "\n"


FIT_SPEED_JSON = Path("benchmarks/calibration_fit.json")


def fit_speed_lines(path: Path) -> list[str]:
    """The fit's speed against its first version (``python -m benchmarks.calibration_fit``)."""
    if not path.exists():
        return []
    recs = json.loads(path.read_text())
    lines = ["The fit alone (what `python -m vllm_seqkv.calibrate` runs after the capture, on the same "
             "vLLM capture of 24,576 tokens, in one process, alternating): the current fit against the fit "
             "of commit f481030 kept verbatim in `benchmarks/calibration_fit.py` (every quantizer width "
             "of every component, samples sorted again per width, one head and one stream at a time). "
             "Both give identical tensors (checked by the benchmark). Command: "
             + ", ".join(f"`{c}`" for c in sorted({r["command"] for r in recs})) + ".", "",
             "| model | preset | seconds before | seconds after | speedup (best of each) | identical "
             "| load average (1 min) before / after |",
             "| --- | --- | ---: | ---: | ---: | --- | --- |"]
    for r in recs:
        lines.append(f"| {r['model']} | {r['preset']} | {', '.join(f'{x:.1f}' for x in r['seconds_before'])} "
                     f"| {', '.join(f'{x:.1f}' for x in r['seconds_after'])} | {r['speedup']}x "
                     f"| {r['identical']} | {r['load_average_before'][0]} / {r['load_average_after'][0]} |")
    return [*lines, ""]


def write_markdown(path: Path, recs: list[dict]) -> None:
    """Replace (or insert before the ruler) the ``## Calibration`` section of ``path``."""
    section = markdown_section(recs)
    text = path.read_text()
    start = text.find("## Calibration\n")
    if start >= 0:
        end = text.index("\n## ", start + 5) + 1
        text = text[:start] + section + text[end:]
    else:
        at = text.index("## Quality (ruler)")
        text = text[:at] + section + "\n" + text[at:]
    path.write_text(text)


TEXTS = ("general", "docs-train")  # calibration texts: the shipped general set, the docs train split


def fits(model_dir: Path, home: Path, parallel: bool, reuse: bool) -> dict[str, dict]:
    """Timed calibrations of ``model_dir`` on each of :data:`TEXTS` into ``home``; recorded in
    ``home/<model>-fits.json`` and, with ``reuse``, taken from there when its files exist."""
    import seqkv_fixtures as fixtures

    record = home / f"{model_dir.name}-fits.json"
    if reuse and record.exists():
        done = json.loads(record.read_text())
        if all(Path(done[label]["path"]).exists() for label in TEXTS):
            return done
    texts = {"general": None, "docs-train": fixtures.corpus_path("train")}
    done: dict[str, dict] = {}

    def run(label):
        done[label] = {**timed_calibration(model_dir, home, texts[label]),
                       "concurrent_fits": len(TEXTS) if parallel else 1,
                       "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}
        print(f"{model_dir.name}: {label} {done[label]}", file=sys.stderr)

    if parallel:
        threads = [threading.Thread(target=run, args=(label,)) for label in TEXTS]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    else:
        for label in TEXTS:
            run(label)
    if set(done) != set(TEXTS):
        raise SystemExit("a calibration failed (see above)")
    home.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(done, indent=1) + "\n")
    return done


def main(argv: list[str] | None = None) -> None:
    import seqkv_fixtures as fixtures
    from vllm_seqkv import calibrate

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=2048, help="evaluated tokens per text")
    parser.add_argument("--chat-prompts", type=int, default=12)
    parser.add_argument("--home", type=Path, help="calibration cache folder of the fits (default: a "
                        "fresh temporary folder, so every fit really runs)")
    parser.add_argument("--parallel", action="store_true", help="run the two fits of a model at once")
    parser.add_argument("--reuse", action="store_true", help="take the fits recorded in --home")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/calibration.json"))
    parser.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"),
                        help="BENCHMARKS.md whose Calibration section is rewritten ('none': none)")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.calibration " + shlex.join(sys.argv[1:])
    dirs = {"tiny": fixtures.tiny_model_dir, "smollm2": fixtures.smollm2_dir}
    preset = calibrate.DEFAULT_PRESET
    records = []
    with tempfile.TemporaryDirectory(prefix="seqkv-calib-bench-") as temporary:
        home = args.home or Path(temporary)
        for name in args.models.split(","):
            model_dir = dirs[name]()
            timings = fits(model_dir, home, args.parallel, args.reuse)
            rob = robustness(model_dir, preset, {label: timings[label]["path"] for label in TEXTS},
                             args.context, args.tokens, args.chat_prompts, command)
            cfg = json.loads((model_dir / "config.json").read_text())
            general = timings["general"]
            records.append({
                "model": model_dir.name, "path": "vllm", "device": f"cpu ({os.cpu_count()} cores, shared)",
                "preset": preset, "seconds": general["seconds"], "peak_rss_bytes": general["peak_rss_bytes"],
                "tokens": calibrate.DEFAULT_TOKENS, "dtype": "float32",
                "load_average_before": general["load_average_before"],
                "load_average_after": general["load_average_after"],
                "concurrent_fits": general.get("concurrent_fits", 1), "niceness": general.get("niceness", 0),
                "in_domain_fit": {k: timings["docs-train"][k] for k in ("seconds", "peak_rss_bytes")},
                "shape": {k: cfg.get(k) for k in ("num_hidden_layers", "num_key_value_heads", "head_dim",
                                                  "hidden_size", "vocab_size")},
                "robustness": rob, "context": args.context,
                "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "command": command})
            print(json.dumps(records[-1], indent=1), file=sys.stderr)
    records = merge_records(json.loads(args.json.read_text()) if args.json.exists() else [], records)
    args.json.write_text(json.dumps(records, indent=1) + "\n")
    if str(args.markdown) != "none":
        write_markdown(args.markdown, records)


def merge_records(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` with each model of ``new`` replaced (or appended): a run of some models keeps
    the others' records."""
    by_model = {r["model"]: r for r in new}
    kept = [by_model.pop(r["model"], r) for r in old]
    return kept + list(by_model.values())


if __name__ == "__main__":
    main()
