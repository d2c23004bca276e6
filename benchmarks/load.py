"""Serving under load: a bounded load test of the real `vllm serve`, seqkv vs auto.

`python -m benchmarks.load [--sessions 200] [--turns 2] [--max-tokens 24]`

For each backend (``auto`` first, then ``seqkv``, same arguments otherwise) it starts
`vllm serve` with the tiny test model on loopback, warms it up, then runs ``--sessions``
concurrent chat sessions, all started at once. Every session picks one of a few shared
system prompts (long enough to fill several KV blocks, so prefix caching shares them) and
runs ``--turns`` streaming turns; each follow-up turn resends the whole conversation so far
(system + earlier questions + the model's earlier answers), as a chat client does.

Each response is checked: no HTTP or client error, exactly one finish chunk with
``finish_reason == "length"`` (``ignore_eos`` makes every answer exactly ``--max-tokens``
long, so "complete" is checkable), a usage chunk whose ``completion_tokens`` equals
``--max-tokens`` and equals the tokens counted in the stream (per-chunk ``logprobs``), and a
non-empty text. The run is bounded: a per-request timeout and a deadline for the whole phase.

Reported per backend: output tokens/s, requests/s, p50/p99 time to first token (TTFT) and
inter-token latency (ITL: per response, the time from its first to its last token
divided by the tokens after the first, i.e. time per output token), prefix-cache hit rate and
preemptions from the server's /metrics; and the ratios
seqkv/auto. Writes ``benchmarks/load.json`` and the section "Serving under load" of
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import seqkv_fixtures as fixtures
from benchmarks.report import replace_section, run_header, write_json
from benchmarks.server import VllmServer

SECTION = "## Serving under load"
MODEL_NAME = "tiny"

QUESTIONS = [
    "What does this section explain?",
    "Summarize the main idea in one sentence.",
    "Which functions are mentioned here?",
    "Give an example of how to use it.",
    "What should a beginner know first?",
    "What are the common mistakes?",
    "How does this relate to the standard library?",
    "Explain the terms used above.",
]
FOLLOW_UPS = [
    "Tell me more about that.",
    "Can you give another example?",
    "Why is that important?",
    "And what about errors?",
]


def scrape_metrics(base_url: str) -> dict[str, float]:
    """Sum of every sample of each metric family of /metrics (labels dropped)."""
    text = urllib.request.urlopen(base_url + "/metrics", timeout=10).read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            values[name] = values.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return values


# ---------------------------------------------------------------------------- workload


def system_prompts(count: int, chars: int) -> list[str]:
    """``count`` distinct system prompts cut from held-out documentation text."""
    text = fixtures.corpus_path("test").read_text()
    paragraphs = [p.strip() for p in text.split("\n\n") if len(p.strip()) > 80]
    prompts, i = [], 0
    for k in range(count):
        body = ""
        while len(body) < chars and i < len(paragraphs):
            body += paragraphs[i] + "\n"
            i += 1
        prompts.append(f"You are assistant #{k}. Answer using this documentation:\n{body[:chars]}")
    return prompts


@dataclass
class Response:
    session: int
    turn: int
    ok: bool = False
    error: str = ""
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    streamed_tokens: int = 0
    ttft_s: float = 0.0
    first_token_s: float = 0.0
    itl_s: float = 0.0
    latency_s: float = 0.0


def check(response: Response, max_tokens: int, finish_chunks: int) -> str:
    """Why a streamed response is incomplete or malformed ('' = complete and well-formed)."""
    problems = []
    if finish_chunks != 1:
        problems.append(f"{finish_chunks} chunks with a finish_reason")
    if response.finish_reason != "length":
        problems.append(f"finish_reason {response.finish_reason!r}")
    if response.completion_tokens != max_tokens:
        problems.append(f"usage.completion_tokens {response.completion_tokens} != {max_tokens}")
    if response.streamed_tokens != response.completion_tokens:
        problems.append(f"{response.streamed_tokens} tokens streamed, usage says "
                        f"{response.completion_tokens}")
    if response.prompt_tokens <= 0:
        problems.append("no prompt_tokens in usage")
    if not response.text.strip():
        problems.append("empty text")
    return "; ".join(problems)


async def one_turn(client, session: int, turn: int, messages: list[dict], max_tokens: int,
                   timeout_s: float) -> Response:
    response = Response(session, turn)
    finish_chunks = 0
    first_tokens = 0
    start = time.perf_counter()
    last = None
    pieces = []
    try:
        async with asyncio.timeout(timeout_s):
            stream = await client.chat.completions.create(
                model=MODEL_NAME, messages=messages, max_tokens=max_tokens, temperature=0,
                stream=True, stream_options={"include_usage": True}, logprobs=True,
                extra_body={"ignore_eos": True})
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.usage is not None:
                    response.prompt_tokens = chunk.usage.prompt_tokens
                    response.completion_tokens = chunk.usage.completion_tokens
                    details = chunk.usage.prompt_tokens_details
                    response.cached_tokens = (details.cached_tokens or 0) if details else 0
                for choice in chunk.choices:
                    tokens = len(choice.logprobs.content) if choice.logprobs and choice.logprobs.content else 0
                    if tokens:
                        response.streamed_tokens += tokens
                        if last is None:
                            response.ttft_s = now - start
                            first_tokens = tokens
                        last = now
                    if choice.delta and choice.delta.content:
                        pieces.append(choice.delta.content)
                    if choice.finish_reason is not None:
                        finish_chunks += 1
                        response.finish_reason = choice.finish_reason
    except Exception as exc:  # every failure is counted and reported, none is fatal
        response.error = f"{type(exc).__name__}: {exc}"[:300]
    response.latency_s = time.perf_counter() - start
    if last is not None and response.streamed_tokens > first_tokens:
        response.itl_s = (last - start - response.ttft_s) / (response.streamed_tokens - first_tokens)
    response.text = "".join(pieces)
    if not response.error:
        response.error = check(response, max_tokens, finish_chunks)
    response.ok = not response.error
    return response


async def session_task(client, session: int, system: str, turns: int, max_tokens: int,
                       timeout_s: float) -> list[Response]:
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": f"{QUESTIONS[session % len(QUESTIONS)]} (#{session})"}]
    responses = []
    for turn in range(turns):
        response = await one_turn(client, session, turn, messages, max_tokens, timeout_s)
        responses.append(response)
        if not response.ok:
            break
        messages = messages + [
            {"role": "assistant", "content": response.text},
            {"role": "user", "content": FOLLOW_UPS[(session + turn) % len(FOLLOW_UPS)]}]
    return responses


async def run_sessions(base_url: str, sessions: int, turns: int, max_tokens: int,
                       systems: list[str], timeout_s: float = 300,
                       deadline_s: float = 1200) -> tuple[list[Response], float]:
    """All sessions at once against ``base_url``; returns the responses and the wall time."""
    import httpx
    import openai

    limits = httpx.Limits(max_connections=sessions + 8, max_keepalive_connections=sessions + 8)
    http = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout_s))
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", http_client=http,
                                max_retries=0)
    start = time.perf_counter()
    try:
        tasks = [asyncio.create_task(session_task(client, i, systems[i % len(systems)], turns,
                                                  max_tokens, timeout_s))
                 for i in range(sessions)]
        done, pending = await asyncio.wait(tasks, timeout=deadline_s)
        for task in pending:
            task.cancel()
        results = []
        for i, task in enumerate(tasks):
            if task in done and task.exception() is None:
                results.extend(task.result())
            else:
                results.append(Response(i, 0, error="session missed the deadline"))
    finally:
        await client.close()
        await http.aclose()
    return results, time.perf_counter() - start


# ---------------------------------------------------------------------------- figures


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(responses: list[Response], wall_s: float) -> dict:
    ok = [r for r in responses if r.ok]
    ttft = [r.ttft_s for r in ok]
    itl = [r.itl_s for r in ok if r.itl_s > 0]
    out_tokens = sum(r.completion_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    return {
        "requests": len(responses),
        "errors": len(responses) - len(ok),
        "error_examples": sorted({r.error for r in responses if not r.ok})[:5],
        "wall_s": wall_s,
        "output_tokens": out_tokens,
        "prompt_tokens": prompt_tokens,
        "cached_prompt_tokens": sum(r.cached_tokens for r in ok),
        "output_tokens_per_s": out_tokens / wall_s,
        "requests_per_s": len(ok) / wall_s,
        "ttft_p50_s": percentile(ttft, 0.5),
        "ttft_p99_s": percentile(ttft, 0.99),
        "itl_p50_s": percentile(itl, 0.5),
        "itl_p99_s": percentile(itl, 0.99),
        "latency_p50_s": percentile([r.latency_s for r in ok], 0.5),
    }


def server_args(backend: str, kv_bytes: int, max_model_len: int, max_num_seqs: int) -> list[str]:
    return ["--served-model-name", MODEL_NAME, "--max-model-len", str(max_model_len),
            "--kv-cache-memory-bytes", str(kv_bytes), "--max-num-seqs", str(max_num_seqs),
            "--enable-prompt-tokens-details", "--disable-uvicorn-access-log",
            "--kv-cache-backend", backend]


def run_backend(model: Path, backend: str, args, systems: list[str], log_dir: Path) -> dict:
    log = log_dir / f"vllm-{backend}.log"
    with VllmServer(model, server_args(backend, args.kv_cache_memory_bytes, args.max_model_len,
                                       args.max_num_seqs), log) as server:
        warm, _ = asyncio.run(run_sessions(server.base_url, 4, 1, args.max_tokens, systems,
                                           args.request_timeout, args.deadline))
        if not all(r.ok for r in warm):
            raise RuntimeError(f"{backend}: warm-up failed: {[r.error for r in warm]}")
        before = scrape_metrics(server.base_url)
        responses, wall = asyncio.run(run_sessions(
            server.base_url, args.sessions, args.turns, args.max_tokens, systems,
            args.request_timeout, args.deadline))
        after = scrape_metrics(server.base_url)
    figures = summarize(responses, wall)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    queries = delta("vllm:prefix_cache_queries_total")
    capacity = re.search(r"KV cache size: ([\d,]+) tokens", log.read_text(errors="replace"))
    figures.update({
        "backend": backend,
        "kv_cache_tokens": int(capacity[1].replace(",", "")) if capacity else None,
        "prefix_cache_hit_rate": delta("vllm:prefix_cache_hits_total") / queries if queries else None,
        "preemptions": delta("vllm:num_preemptions_total"),
        "log": str(log),
    })
    print(json.dumps({k: v for k, v in figures.items() if k != "error_examples"}), flush=True)
    return figures


RATIOS = ("output_tokens_per_s", "requests_per_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s",
          "itl_p99_s")


def markdown(record: dict) -> str:
    a, s = record["auto"], record["seqkv"]
    rows = ["| figure | auto | seqkv | seqkv / auto |", "| --- | ---: | ---: | ---: |"]
    labels = {"output_tokens_per_s": ("throughput (output tokens/s)", 1, "{:.1f}"),
              "requests_per_s": ("requests/s", 1, "{:.2f}"),
              "ttft_p50_s": ("TTFT p50 (ms)", 1000, "{:.0f}"),
              "ttft_p99_s": ("TTFT p99 (ms)", 1000, "{:.0f}"),
              "itl_p50_s": ("inter-token latency p50 (ms)", 1000, "{:.1f}"),
              "itl_p99_s": ("inter-token latency p99 (ms)", 1000, "{:.1f}")}
    for key, (label, scale, fmt) in labels.items():
        rows.append(f"| {label} | {fmt.format(a[key] * scale)} | {fmt.format(s[key] * scale)} "
                    f"| **{record['ratios'][key]:.2f}** |")
    rows.append(f"| requests / errors | {a['requests']} / {a['errors']} | "
                f"{s['requests']} / {s['errors']} | |")
    rows.append(f"| wall time (s) | {a['wall_s']:.1f} | {s['wall_s']:.1f} | |")
    hit = lambda r: "n/a" if r["prefix_cache_hit_rate"] is None else f"{100 * r['prefix_cache_hit_rate']:.0f} %"  # noqa: E731
    rows.append(f"| prefix-cache hit rate (tokens) | {hit(a)} | {hit(s)} | |")
    tokens = lambda r: "n/a" if r["kv_cache_tokens"] is None else f"{r['kv_cache_tokens']:,}"  # noqa: E731
    rows.append(f"| KV capacity (tokens, vLLM's count) | {tokens(a)} | {tokens(s)} | |")
    rows.append(f"| preemptions | {a['preemptions']:.0f} | {s['preemptions']:.0f} | |")
    p = record["params"]
    return (
        f"Command: `{record['command']}`  \n"
        f"Machine: {record['machine']}. Date: {record['date']}.\n\n"
        f"Real `vllm serve` (CPU build 0.32) on loopback with the tiny test model, once per "
        f"backend in the same invocation with the same arguments (`--kv-cache-memory-bytes "
        f"{p['kv_cache_memory_bytes']}`, `--max-model-len {p['max_model_len']}`, "
        f"`--max-num-seqs {p['max_num_seqs']}`). {p['sessions']} concurrent streaming chat "
        f"sessions (OpenAI client), all started at once, {p['systems']} shared system prompts "
        f"of ~{p['system_chars']} characters, {p['turns']} turns each (each follow-up resends "
        f"the conversation with the model's earlier answers), {p['max_tokens']} output tokens "
        f"per turn (`ignore_eos`, greedy). Every response checked complete and well-formed: "
        f"one finish chunk with `finish_reason` `length`, usage tokens = requested = tokens "
        f"counted in the stream, non-empty text. TTFT from sending the request to the first "
        f"token; inter-token latency per response = (last token - first token) / (tokens - 1), "
        f"p50/p99 over responses. "
        f"Client and server share the machine's cores. seqkv: preset `{record.get('preset', '?')}` "
        f"(the default), attention by {record.get('seqkv_path', '?')}. Load on the machine "
        f"(`uptime`) at start: `{record.get('uptime_at_start', '?')}`; at end: "
        f"`{record.get('uptime_at_end', '?')}`. Raw figures: `benchmarks/load.json`.\n\n"
        + "\n".join(rows) + "\n"
    )


def uptime() -> str:
    """``uptime``'s line (load averages): contention from other processes during the run."""
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def seqkv_path() -> str:
    """Which seqkv CPU attention the servers run (they inherit this environment)."""
    from vllm_seqkv.kernels import implementation

    kind = implementation("cpu")
    return {"cpp": "the fused C++ CPU ops (`csrc/cpu/`, `SEQKV_KERNELS=cpp`, the default on CPU)",
            "torch": "the pure-torch reference path (`SEQKV_KERNELS=torch`): every page decoded back "
                     "to dense tensors at every step and layer"}.get(kind, kind)


def optional_path(text: str) -> Path | None:
    return Path(text) if text else None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the tiny test model")
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--systems", type=int, default=4, help="distinct shared system prompts")
    parser.add_argument("--system-chars", type=int, default=1500)
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=128 << 20)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--request-timeout", type=float, default=600)
    parser.add_argument("--deadline", type=float, default=1800, help="seconds for one phase")
    parser.add_argument("--backends", default="auto,seqkv")
    parser.add_argument("--log-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "seqkv-load", help="server logs")
    parser.add_argument("--json", type=optional_path, default=Path("benchmarks/load.json"),
                        help="'' = do not write")
    parser.add_argument("--markdown", type=optional_path, default=Path("BENCHMARKS.md"),
                        help="'' = do not write")
    args = parser.parse_args(argv)
    model = args.model or fixtures.tiny_model_dir()
    systems = system_prompts(args.systems, args.system_chars)
    from vllm_seqkv.config import DEFAULT_PRESET

    record: dict = {
        **run_header("benchmarks.load", argv),
        "model": Path(model).name,
        "preset": DEFAULT_PRESET,
        "seqkv_kernels_env": os.environ.get("SEQKV_KERNELS", "(unset: auto)"),
        "seqkv_path": seqkv_path(),
        "uptime_at_start": uptime(),
        "params": {"sessions": args.sessions, "turns": args.turns, "max_tokens": args.max_tokens,
                   "systems": args.systems, "system_chars": args.system_chars,
                   "kv_cache_memory_bytes": args.kv_cache_memory_bytes,
                   "max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs},
    }
    for backend in args.backends.split(","):
        record[backend] = run_backend(model, backend, args, systems, args.log_dir)
    record["uptime_at_end"] = uptime()
    if "auto" in record and "seqkv" in record:
        record["ratios"] = {k: record["seqkv"][k] / record["auto"][k] for k in RATIOS}
        record["zero_errors"] = record["auto"]["errors"] == 0 and record["seqkv"]["errors"] == 0
        if args.json:
            write_json(args.json, record)
        if args.markdown:
            replace_section(args.markdown, SECTION, markdown(record))
        print(json.dumps(record["ratios"], indent=2))
    failed = [b for b in args.backends.split(",") if record[b]["errors"]]
    if failed:
        for b in failed:
            print(f"{b}: {record[b]['errors']} bad responses, e.g. {record[b]['error_examples']}",
                  file=sys.stderr)
        raise SystemExit(1)
    return record


if __name__ == "__main__":
    main()
