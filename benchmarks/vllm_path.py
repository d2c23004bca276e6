"""Capacity and quality through the real vLLM engine: `--kv-cache-backend seqkv` vs `auto`.

`python -m benchmarks.vllm_path [--model DIR] [--context 2048] [--windows 4]`

For each backend, one engine with the same ``kv_cache_memory_bytes`` reports
- capacity: the number of KV tokens vLLM fits (its own block count x block size, the figure
  of its "KV cache size: N tokens" log line);
- perplexity on held-out text from prompt log-probabilities (windows of ``--context``
  tokens, the same code path that serves requests);
- greedy generations on fixed prompts, compared token by token with the ``auto`` run.
Writes ``benchmarks/vllm_capacity.json`` (a list of records, newest last per model).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import shlex
import sys
from pathlib import Path

import seqkv_fixtures as fixtures
from benchmarks.report import machine, replace_section
from vllm_seqkv.codec.presets import DEFAULT_PRESET

SECTION = "## Capacity and quality through vLLM"

GREEDY_PROMPTS = 12
GREEDY_TOKENS = 32


def held_out_windows(tokenizer, text: str, context: int, windows: int) -> list[list[int]]:
    ids = tokenizer(text[: context * windows * 8])["input_ids"]
    return [ids[i * context:(i + 1) * context] for i in range(windows)
            if len(ids) >= (i + 1) * context]


def greedy_prompts(text: str) -> list[str]:
    paragraphs = [p.strip() for p in text.split("\n\n") if len(p.strip()) > 200]
    step = max(1, len(paragraphs) // GREEDY_PROMPTS)
    return [p[:300] for p in paragraphs[::step][:GREEDY_PROMPTS]]


def run_backend(model: Path, backend: str, kv_bytes: int, context: int,
                windows: list[list[int]], prompts: list[str], preset: str | None) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    extra = {"kv_cache_backend": backend}
    if preset:
        extra["seqkv"] = {"preset": preset}
    llm = LLM(model=str(model), max_model_len=context + GREEDY_TOKENS + 64,
              kv_cache_memory_bytes=kv_bytes, additional_config=extra, seed=0,
              enable_prefix_caching=False)
    try:
        cache = llm.llm_engine.vllm_config.cache_config
        tokens = cache.num_gpu_blocks * cache.block_size
        scoring = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
        nll, count = 0.0, 0
        for out in llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], scoring):
            for token_id, logprobs in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
                nll -= logprobs[token_id].logprob
                count += 1
        greedy = SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0)
        generations = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, greedy)]
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return {"tokens": tokens, "ppl": math.exp(nll / count), "scored_tokens": count,
            "generations": generations}


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean fraction of each greedy continuation that matches before the first divergence."""
    fractions = []
    for x, y in zip(a, b):
        same = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
        fractions.append(same / max(len(x), 1))
    return sum(fractions) / len(fractions)


def markdown(records: list[dict]) -> str:
    rows = [
        "| date | model | preset | KV budget | tokens auto | tokens seqkv | ratio | ppl auto "
        "| ppl seqkv | Δppl | greedy agreement | command |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        rows.append(
            f"| {r['date']} | {r['model']} | {r['preset']} | {r['kv_cache_memory_bytes'] >> 20} MiB "
            f"| {r['tokens_auto']:,} | {r['tokens_seqkv']:,} | {r['ratio']:.2f}x "
            f"| {r['ppl_auto']:.3f} | {r['ppl_seqkv']:.3f} | {r['delta_ppl_pct']:+.1f} % "
            f"| {r['greedy_agreement']:.2f} | `{r['command']}` |"
        )
    return (
        "Real vLLM engine (CPU build 0.32), same `kv_cache_memory_bytes` for both backends; "
        "tokens = vLLM's own KV capacity (its `KV cache size: N tokens` line); perplexity from "
        "prompt log-probabilities over held-out windows of `context` tokens (the serving code "
        "path); greedy agreement = mean fraction of a 32-token greedy continuation that matches "
        "the `auto` run before the first divergence. Model weights and compute in bf16. "
        "Rows dated before 2026-12-05 (and that day's first) predate the fixed-memory accounting: the seqkv "
        "pages got the whole budget, its fixed memory came on top (see \"Engine memory under load\"). "
        f"Machine: {machine().split(', torch')[0]}.\n\n"
        + "\n".join(rows) + "\n"
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vllm_path")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--text", type=Path, default=None)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=256 << 20)
    parser.add_argument("--preset", default=None)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/vllm_capacity.json"))
    parser.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"))
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    model = args.model or fixtures.smollm2_dir()
    text = (args.text or fixtures.corpus_path("test")).read_text()
    windows = held_out_windows(AutoTokenizer.from_pretrained(model), text, args.context,
                               args.windows)
    prompts = greedy_prompts(text)
    runs = {b: run_backend(model, b, args.kv_cache_memory_bytes, args.context, windows,
                           prompts, args.preset if b == "seqkv" else None)
            for b in ("auto", "seqkv")}
    record = {
        "model": model.name,
        "preset": args.preset or DEFAULT_PRESET,
        "kv_cache_memory_bytes": args.kv_cache_memory_bytes,
        "tokens_auto": runs["auto"]["tokens"],
        "tokens_seqkv": runs["seqkv"]["tokens"],
        "ratio": runs["seqkv"]["tokens"] / runs["auto"]["tokens"],
        "ppl_auto": runs["auto"]["ppl"],
        "ppl_seqkv": runs["seqkv"]["ppl"],
        "delta_ppl_pct": 100 * (runs["seqkv"]["ppl"] / runs["auto"]["ppl"] - 1),
        "scored_tokens": runs["auto"]["scored_tokens"],
        "context": args.context,
        "greedy_agreement": agreement(runs["auto"]["generations"], runs["seqkv"]["generations"]),
        "greedy_prompts": len(prompts),
        "date": dt.date.today().isoformat(),
        "command": "python -m benchmarks.vllm_path " + shlex.join(argv or sys.argv[1:]),
    }
    if args.json:
        records = json.loads(args.json.read_text()) if args.json.exists() else []
        records.append(record)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=2) + "\n")
        if args.markdown:
            replace_section(args.markdown, SECTION, markdown(records))
    print(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    main()
