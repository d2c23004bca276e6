"""Engine memory under the load benchmark's traffic, seqkv vs auto, at the same settings.

`python -m benchmarks.memory [--sessions 200] [--turns 2] [--max-tokens 24]`

For each backend (``auto`` first, then ``seqkv``) it starts `vllm serve` with the tiny test
model and the load benchmark's arguments (same ``--kv-cache-memory-bytes``,
``--max-model-len``, ``--max-num-seqs``), runs its traffic (concurrent multi-turn chat
sessions over shared system prompts, :mod:`benchmarks.load`; its defaults, no warm-up), and
reads:

* the engine core process's peak resident memory: ``VmHWM`` of ``/proc/PID/status`` (the
  kernel's high-water mark, nothing missed between samples) when the traffic has ended; the
  engine core holds the model, the KV pages and (CPU, one worker) everything seqkv keeps;
* the whole server tree's resident memory (API server + engine core + helpers), sampled every
  0.2 s, its peak;
* vLLM's KV capacity (tokens) and, for seqkv, its fixed memory by part and what it took from
  the budget (``seqkv_fixed_bytes``, ``seqkv_fixed_bytes_taken_from_kv_budget`` of /metrics).

Writes ``benchmarks/memory.json`` and the section "Engine memory under load" of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import tempfile
import threading
import time
from pathlib import Path

import seqkv_fixtures as fixtures
from benchmarks import load
from benchmarks.report import replace_section, run_header, write_json
from benchmarks.server import VllmServer

SECTION = "## Engine memory under load"
ENGINE_PROCESS = "EngineCore"  # vLLM names its engine core process VLLM::EngineCore


class TreeMemory:
    """Samples the resident memory of ``pid`` and its descendants every ``period_s`` seconds."""

    def __init__(self, pid: int, period_s: float = 0.2):
        import psutil

        self.root = psutil.Process(pid)
        self.period_s = period_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def processes(self):
        return [self.root, *self.root.children(recursive=True)]

    def rss_bytes(self) -> int:
        import psutil

        total = 0
        for process in self.processes():
            try:
                total += process.memory_info().rss
            except psutil.Error:  # exited between listing and reading
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self.rss_bytes())
            self._stop.wait(self.period_s)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def engine_pid(self) -> int:
        for process in self.processes():
            if ENGINE_PROCESS in process.name() or ENGINE_PROCESS in " ".join(process.cmdline()):
                return process.pid
        raise RuntimeError(f"no {ENGINE_PROCESS} process under pid {self.root.pid}")


def status_bytes(pid: int, field: str) -> int:
    """``VmHWM`` / ``VmRSS`` of ``/proc/PID/status`` in bytes."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M)[1]) * 1024


def fixed_memory_gauges(metrics_text: str) -> dict:
    """seqkv's fixed memory gauges of a /metrics text: ``{"parts": {part: bytes},
    "taken_from_kv_budget": bytes}``."""
    parts = {}
    for labels, value in re.findall(r"^seqkv_fixed_bytes\{([^}]*)\} (\S+)$", metrics_text, re.M):
        parts[re.search(r'part="(\w+)"', labels)[1]] = int(float(value))
    taken = re.search(r"^seqkv_fixed_bytes_taken_from_kv_budget\{[^}]*\} (\S+)$", metrics_text, re.M)
    return {"parts": parts, "taken_from_kv_budget": int(float(taken[1])) if taken else None}


def run_backend(model: Path, backend: str, args, systems: list[str]) -> dict:
    import urllib.request

    log = args.log_dir / f"vllm-memory-{backend}.log"
    server_args = load.server_args(backend, args.kv_cache_memory_bytes, args.max_model_len,
                                   args.max_num_seqs)
    with VllmServer(model, server_args, log) as server, TreeMemory(server.proc.pid) as tree:
        engine = tree.engine_pid()
        idle = {"engine_rss_bytes": status_bytes(engine, "VmRSS"), "tree_rss_bytes": tree.rss_bytes()}
        responses, wall = asyncio.run(load.run_sessions(
            server.base_url, args.sessions, args.turns, args.max_tokens, systems,
            args.request_timeout, args.deadline))
        time.sleep(2 * tree.period_s)  # one more sample after the last response
        peak_engine = status_bytes(engine, "VmHWM")
        metrics = urllib.request.urlopen(server.base_url + "/metrics", timeout=10).read().decode()
    capacity = re.search(r"KV cache size: ([\d,]+) tokens", log.read_text(errors="replace"))
    traffic = load.summarize(responses, wall)
    figures = {
        "backend": backend,
        "engine_peak_rss_bytes": peak_engine,
        "tree_peak_rss_bytes": tree.peak_bytes,
        "idle_after_start": idle,
        "kv_cache_tokens": int(capacity[1].replace(",", "")) if capacity else None,
        "requests": traffic["requests"], "errors": traffic["errors"],
        "error_examples": traffic["error_examples"], "output_tokens": traffic["output_tokens"],
        "wall_s": wall, "log": str(log),
    }
    if backend == "seqkv":
        figures["fixed_memory"] = fixed_memory_gauges(metrics)
    print(json.dumps({k: v for k, v in figures.items() if k != "error_examples"}), flush=True)
    return figures


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def markdown(record: dict) -> str:
    a, s, p = record["auto"], record["seqkv"], record["params"]
    rows = ["| figure | auto | seqkv | seqkv - auto |", "| --- | ---: | ---: | ---: |"]
    for label, key in (("engine core peak RSS (VmHWM, MiB)", "engine_peak_rss_bytes"),
                       ("server tree peak RSS (sampled, MiB)", "tree_peak_rss_bytes")):
        rows.append(f"| {label} | {mib(a[key])} | {mib(s[key])} | {mib(s[key] - a[key])} |")
    idle_a, idle_s = a["idle_after_start"]["engine_rss_bytes"], s["idle_after_start"]["engine_rss_bytes"]
    rows.append(f"| engine core RSS after start, before traffic (MiB) | {mib(idle_a)} | {mib(idle_s)} | "
                f"{mib(idle_s - idle_a)} |")
    rows.append(f"| KV capacity (tokens, vLLM's count) | {a['kv_cache_tokens']:,} | {s['kv_cache_tokens']:,} | |")
    rows.append(f"| requests / errors | {a['requests']} / {a['errors']} | {s['requests']} / {s['errors']} | |")
    fixed = s["fixed_memory"]
    parts = ", ".join(f"{name.replace('_', ' ')} {mib(size)}" for name, size in fixed["parts"].items())
    return (
        f"Command: `{record['command']}`  \n"
        f"Machine: {record['machine']}. Date: {record['date']}. Load (`uptime`) at start: "
        f"`{record['uptime_at_start']}`; at end: `{record['uptime_at_end']}`.\n\n"
        f"Real `vllm serve` (CPU build 0.32), tiny test model, once per backend in one invocation "
        f"with the load benchmark's arguments (`--kv-cache-memory-bytes {p['kv_cache_memory_bytes']}`, "
        f"`--max-model-len {p['max_model_len']}`, `--max-num-seqs {p['max_num_seqs']}`) and its "
        f"traffic ({p['sessions']} concurrent chat sessions, {p['turns']} turns, "
        f"{p['max_tokens']} output tokens per turn, {p['systems']} shared system prompts). Engine "
        f"core peak: the kernel's high-water mark of its resident memory after the traffic. "
        f"seqkv (preset `{record['preset']}`) takes its fixed memory from the KV budget: "
        f"{mib(fixed['taken_from_kv_budget'])} MiB of the {mib(p['kv_cache_memory_bytes'])} MiB "
        f"(its parts, MiB, from `/metrics`: {parts}; the sink table at its bound for the engine's "
        f"block count, scratch a bound on per-step buffers that is not taken from an explicit "
        f"budget). Raw figures: `benchmarks/memory.json`.\n\n" + "\n".join(rows) + "\n"
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the tiny test model")
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--systems", type=int, default=4)
    parser.add_argument("--system-chars", type=int, default=1500)
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=128 << 20)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--request-timeout", type=float, default=600)
    parser.add_argument("--deadline", type=float, default=1200)
    parser.add_argument("--log-dir", type=Path, default=Path(tempfile.gettempdir()) / "seqkv-memory")
    parser.add_argument("--json", type=load.optional_path, default=Path("benchmarks/memory.json"))
    parser.add_argument("--markdown", type=load.optional_path, default=Path("BENCHMARKS.md"))
    args = parser.parse_args(argv)
    model = args.model or fixtures.tiny_model_dir()
    systems = load.system_prompts(args.systems, args.system_chars)
    from vllm_seqkv.config import DEFAULT_PRESET

    record: dict = {
        **run_header("benchmarks.memory", argv), "model": Path(model).name, "preset": DEFAULT_PRESET,
        "uptime_at_start": load.uptime(),
        "params": {"sessions": args.sessions, "turns": args.turns, "max_tokens": args.max_tokens,
                   "systems": args.systems, "system_chars": args.system_chars,
                   "kv_cache_memory_bytes": args.kv_cache_memory_bytes,
                   "max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs},
    }
    for backend in ("auto", "seqkv"):
        record[backend] = run_backend(model, backend, args, systems)
    record["uptime_at_end"] = load.uptime()
    record["engine_peak_rss_delta_bytes"] = (record["seqkv"]["engine_peak_rss_bytes"]
                                             - record["auto"]["engine_peak_rss_bytes"])
    if args.json:
        write_json(args.json, record)
    if args.markdown:
        replace_section(args.markdown, SECTION, markdown(record))
    failed = [b for b in ("auto", "seqkv") if record[b]["errors"]]
    if failed:
        raise SystemExit(f"errors under load with {failed}: see {args.json}")
    return record


if __name__ == "__main__":
    main()
