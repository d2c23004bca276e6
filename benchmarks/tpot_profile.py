"""Where a decode step's time goes through the CPU vLLM engine: torch.profiler over decode steps.

    python -m benchmarks.tpot_profile [--context 8192] [--batch 1] [--tokens 16]

Per backend (``auto``, then ``seqkv`` with the default preset): an in-process engine
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so the model runs in this process and the profiler sees
its ops), the setup of ``benchmarks/tpot.py`` (one shared prompt of ``context`` tokens,
``batch`` requests differing in their last token, prefilled by a warm-up), then
``max_tokens=1`` and ``max_tokens=1+N`` runs; the profile of the second run minus the first
(same prefill and scheduling) is the decode steps'. Reported per backend: total CPU ms per
output token and the top ops by self CPU time per output token. Writes
``benchmarks/tpot_profile.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def self_times(prof) -> dict:
    """Self CPU time (ms) and call count per op name."""
    return {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()}


def run_backend(model: Path, backend: str, context: int, batch: int, new_tokens: int, ids, max_len: int) -> dict:
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from benchmarks.tpot import prompt_length

    llm = LLM(model=str(model), max_model_len=min(context + new_tokens + 64, max_len),
              kv_cache_memory_bytes=4 << 30, additional_config={"kv_cache_backend": backend}, seed=0,
              max_num_seqs=batch, enable_prefix_caching=True)
    try:
        length = prompt_length(context, new_tokens, max_len)
        prompt = ids[:length - 1]
        llm.generate([TokensPrompt(prompt_token_ids=prompt + [ids[length]])], SamplingParams(max_tokens=1),
                     use_tqdm=False)
        prompts = [TokensPrompt(prompt_token_ids=prompt + [ids[length + 1 + i]]) for i in range(batch)]
        profiles = {}
        llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)  # see tpot.py
        for n in (1, 1 + new_tokens):
            params = SamplingParams(max_tokens=n, min_tokens=n, temperature=0, ignore_eos=True)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                llm.generate(prompts, params, use_tqdm=False)
            profiles[n] = self_times(prof)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    short, full = profiles[1], profiles[1 + new_tokens]
    zero = (0.0, 0)
    per_token = {k: tuple((full[k][i] - short.get(k, zero)[i]) / new_tokens for i in (0, 1)) for k in full}
    top = sorted(per_token.items(), key=lambda kv: -kv[1][0])[:20]
    total = sum(v[0] for v in per_token.values() if v[0] > 0)
    result = {"cpu_ms_per_token": round(total, 2),
              "top_ops_ms_per_token": {k: round(v[0], 3) for k, v in top},
              "top_ops_calls_per_token": {k: round(v[1], 1) for k, v in top}}
    print(backend, json.dumps(result, indent=1), flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoConfig, AutoTokenizer

    import seqkv_fixtures as fixtures
    from benchmarks.report import machine
    from vllm_seqkv.config import DEFAULT_PRESET

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--backends", default="auto,seqkv", help="one engine per process is the cleaner "
                        "profile: a second in-process engine ran far slower here")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/tpot_profile.json"))
    args = parser.parse_args(argv)
    model = fixtures.smollm2_dir()
    max_len = AutoConfig.from_pretrained(model).max_position_embeddings
    ids = AutoTokenizer.from_pretrained(model)(fixtures.corpus_path("test").read_text()[: 12 * args.context])[
        "input_ids"]
    uptime = lambda: subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()  # noqa: E731
    record = {"command": f"python -m benchmarks.tpot_profile --context {args.context} --batch {args.batch} "
                         f"--tokens {args.tokens} --backends {args.backends} --json {args.json}",
              "machine": machine(), "preset": DEFAULT_PRESET, "uptime_at_start": uptime()}
    for backend in args.backends.split(","):
        record[backend] = run_backend(model, backend, args.context, args.batch, args.tokens, ids, max_len)
    record["uptime_at_end"] = uptime()
    args.json.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
