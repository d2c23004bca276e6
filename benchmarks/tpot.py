"""Time per output token through the CPU vLLM engine: `auto` vs `seqkv`, long contexts.

    python -m benchmarks.tpot [--contexts 4096,8192] [--batches 1,16] [--preset P] [--tokens 32]
                              [--prompts shared|distinct] [--repeats 3]

For each backend, one in-process engine (same KV budget, prefix caching on). Per (context,
batch): one prompt of ``context`` held-out tokens, shared by ``batch`` requests that differ
in their last token (so vLLM prefills the shared blocks once and seqkv reads them once per
layer, ``integration/decode_plan.py``); with ``--prompts distinct`` each request has its own
``context`` tokens of the text instead (nothing shared); a warm-up request with
``max_tokens=1`` prefills it, the batch itself runs once untimed (its last blocks cached), then
the batch runs with ``max_tokens=1`` and with
``max_tokens=1+N``, ``repeats`` times, and time per output token is the median of the
differences over ``N`` (prefill and scheduling cancel; one pair alone varied by up to ~1.5x
between runs). Ratios are seqkv / auto from the same process. Writes
``benchmarks/tpot.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import time
from datetime import date
from pathlib import Path


def prompt_length(context: int, new_tokens: int, max_len: int) -> int:
    """Tokens of the shared prompt (its last one differs per request) for ``context``: the
    context itself, or as many as fit when ``context + 1 + new_tokens`` would pass the model's
    ``max_len`` (SmolLM2: 8192 positions, so "8k" decodes positions ``8192 - 1 - N`` on)."""
    return min(context, max_len - 1 - new_tokens)


def batch_prompts(ids: list[int], length: int, batch: int, distinct: bool) -> list[list[int]]:
    """``batch`` prompts of ``length`` tokens: one shared prompt whose last token differs per
    request, or (``distinct``) consecutive windows of the text."""
    if distinct:
        if len(ids) < batch * length:
            raise SystemExit(f"--prompts distinct: the held-out text has {len(ids)} tokens, "
                             f"{batch} x {length} are needed")
        return [ids[i * length:(i + 1) * length] for i in range(batch)]
    return [ids[:length - 1] + [ids[length + 1 + i]] for i in range(batch)]


def run_backend(model: Path, backend: str, preset: str | None, contexts, batches, new_tokens, ids,
                max_len: int, distinct: bool = False, repeats: int = 1) -> tuple[dict, dict]:
    """Median seconds per output token of ``repeats`` timed pairs per (context, batch), and every
    repeat's figure."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    extra = {"kv_cache_backend": backend}
    if backend == "seqkv" and preset:
        extra["seqkv"] = {"preset": preset}
    llm = LLM(model=str(model), max_model_len=min(max(contexts) + new_tokens + 64, max_len),
              kv_cache_memory_bytes=4 << 30, additional_config=extra, seed=0,
              max_num_seqs=max(batches), enable_prefix_caching=True)
    out, out_repeats = {}, {}
    try:
        for context in contexts:
            length = prompt_length(context, new_tokens, max_len)
            prompt = ids[:length - 1]
            warm = SamplingParams(max_tokens=1, temperature=0)
            llm.generate([TokensPrompt(prompt_token_ids=prompt + [ids[length]])], warm, use_tqdm=False)
            for batch in batches:
                prompts = [TokensPrompt(prompt_token_ids=p) for p in batch_prompts(ids, length, batch, distinct)]
                # the exact prompts once first: the timed runs then both find every full block
                # cached (else the first would prefill the last block and the second not)
                llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
                per_token = []
                for _ in range(repeats):
                    timings = {}
                    for n in (1, 1 + new_tokens):
                        params = SamplingParams(max_tokens=n, min_tokens=n, temperature=0, ignore_eos=True)
                        start = time.perf_counter()
                        llm.generate(prompts, params, use_tqdm=False)
                        timings[n] = time.perf_counter() - start
                    per_token.append((timings[1 + new_tokens] - timings[1]) / new_tokens)
                out[f"{context}x{batch}"] = statistics.median(per_token)
                out_repeats[f"{context}x{batch}"] = per_token
                print(backend, context, batch, f"{1000 * out[f'{context}x{batch}']:.1f} ms/token",
                      [round(1000 * t, 1) for t in per_token], flush=True)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return out, out_repeats


def uptime() -> str:
    """``uptime``'s line (load averages): contention from other processes during the run."""
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoConfig, AutoTokenizer

    import seqkv_fixtures as fixtures
    from benchmarks.report import machine
    from vllm_seqkv.codec.presets import DEFAULT_PRESET

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contexts", default="4096,8192")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--preset", default=DEFAULT_PRESET)
    parser.add_argument("--prompts", choices=("shared", "distinct"), default="shared")
    parser.add_argument("--repeats", type=int, default=3, help="timed (1, 1+N) pairs per cell; the median is kept")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/tpot.json"))
    args = parser.parse_args(argv)
    distinct = args.prompts == "distinct"
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    model = fixtures.smollm2_dir()
    text = fixtures.corpus_path("test").read_text()
    max_len = AutoConfig.from_pretrained(model).max_position_embeddings
    chars = 12 * max(contexts) * (max(batches) if distinct else 1)
    ids = AutoTokenizer.from_pretrained(model)(text[:chars])["input_ids"]
    uptime_start = uptime()
    measured = {b: run_backend(model, b, args.preset, contexts, batches, args.tokens, ids, max_len, distinct,
                               args.repeats)
                for b in ("auto", "seqkv")}
    runs = {b: m[0] for b, m in measured.items()}
    record = {
        "date": date.today().isoformat(), "machine": machine(), "model": model.name, "preset": args.preset,
        "command": "python -m benchmarks.tpot " + " ".join(
            f"--{k} {v}" for k, v in (("contexts", args.contexts), ("batches", args.batches),
                                      ("tokens", args.tokens), ("preset", args.preset), ("prompts", args.prompts),
                                      ("repeats", args.repeats))),
        "prompts": args.prompts,
        "uptime_at_start": uptime_start, "uptime_at_end": uptime(),
        "prompt_tokens": {c: prompt_length(c, args.tokens, max_len) for c in contexts},
        "seconds_per_token": runs,
        "seconds_per_token_repeats": {b: m[1] for b, m in measured.items()},
        "ratio_seqkv_over_auto": {k: runs["seqkv"][k] / runs["auto"][k] for k in runs["auto"]},
    }
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["ratio_seqkv_over_auto"], indent=2))


if __name__ == "__main__":
    main()
