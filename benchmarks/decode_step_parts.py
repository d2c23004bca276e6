"""What a decode step costs, part by part, through the CPU vLLM engine: seqkv's ops stubbed out.

    python -m benchmarks.decode_step_parts [--context 1024] [--tokens 64] [--repeats 5]

One sequence (SmolLM2-135M-Instruct, a prompt of ``context`` held-out tokens, eager mode,
in-process engine, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``), time per output token = (run with
``max_tokens=1+N`` - run with ``max_tokens=1``) / N, ``repeats`` times per variant, each
variant in a fresh process:

* ``auto``: vLLM's bf16 cache;
* ``seqkv``: the default preset with the C++ ops; also the wall time of every call of the
  decode and write wrappers (``vllm_seqkv.kernels.cpu_ops``: the checked functions, or in a
  decode-only step the layer's ``DecodeStepOps`` methods) and of the ops inside them, in
  the engine (between two calls the model's other layers run: the ops meet their tables and
  code cold), and the last call of each wrapper replayed 200 times back to back (warm);
* ``seqkv, no decode op``: the same engine with the decode wrapper returning zeros (attention
  output wrong, everything else the same work);
* ``seqkv, no decode or write op``: also the write wrapper doing nothing.

Every variant also times each call of vLLM's attention layer (``attention layer``: the KV write
and the attention with vLLM's dispatch, per layer and step; its median is a decode step's).

The differences say what the two ops cost in the engine, and what remains (Python, metadata,
the model) against ``auto``. NOT a serving configuration: the stubbed variants generate
garbage; only their timing is read. Writes ``benchmarks/decode_step_parts.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("auto", "seqkv", "seqkv, no decode op", "seqkv, no decode or write op")


def _prompt_ids(context: int) -> list[int]:
    from transformers import AutoTokenizer

    import seqkv_fixtures as fixtures

    text = fixtures.corpus_path("test").read_text()[:12 * context]
    return AutoTokenizer.from_pretrained(fixtures.smollm2_dir())(text)["input_ids"][:context]


def _stub_ops(variant: str, calls: dict, last: dict) -> None:
    """Replace or time the C++ op wrappers (see the module docstring); ``last``: the last call
    of each timed one, ``(function, args, kwargs)``, to replay."""
    import torch

    import vllm_seqkv.kernels as kernels
    from vllm_seqkv.kernels import cpu_ops

    def timed(name, fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            calls.setdefault(name, []).append(time.perf_counter() - start)
            last[name] = (fn, args, kwargs)
            return out
        return run

    def no_decode(query, own_k, own_v, *args, return_lse=False, **kwargs):
        out = torch.zeros_like(query)
        return (out, torch.zeros(query.shape[:2])) if return_lse else out

    decode, write = cpu_ops.transform_decode_attention_cpp, cpu_ops.write_transform_tokens_cpp
    # a decode-only step calls the ops through the layer's DecodeStepOps, other steps through
    # the wrappers: both are timed (or stubbed) alike (a tree before DecodeStepOps, for an A/B:
    # the wrappers only)
    step_ops = getattr(cpu_ops, "DecodeStepOps", None)
    step_decode, step_write = (step_ops.decode, step_ops.write_tokens) if step_ops else (None, None)
    if variant == "seqkv":
        decode_op = torch.ops.seqkv.cpu_transform_decode_attention
        write_op = torch.ops.seqkv.cpu_write_transform_tokens
        ops = {"cpu_transform_decode_attention": timed("decode op", decode_op),
               "cpu_write_transform_tokens": timed("write op", write_op)}

        class SeqkvOps:  # the wrappers call torch.ops.seqkv.<name>: the timed ones here
            def __getattr__(self, name):
                return ops.get(name) or getattr(torch.ops.seqkv, name)

        class Torch:
            ops = type("Ops", (), {"seqkv": SeqkvOps()})()

            def __getattr__(self, name):
                return getattr(torch, name)

        cpu_ops.torch = Torch()
        decode, write = timed("decode wrapper", decode), timed("write wrapper", write)
        step_decode, step_write = timed("decode wrapper", step_decode), timed("write wrapper", step_write)
    if "no decode" in variant:
        decode = no_decode

        def step_decode(self, query, *args, **kwargs):
            return no_decode(query, None, None, return_lse=True)
    if "write op" in variant:
        def write(key, *args, **kwargs):
            return torch.zeros((), dtype=torch.long)

        def step_write(self, key, *args, **kwargs):
            return torch.zeros((), dtype=torch.long)
    kernels._function.cache_clear()  # the dispatch table resolves the module attributes again
    cpu_ops.transform_decode_attention_cpp, cpu_ops.write_transform_tokens_cpp = decode, write
    if step_ops is not None:
        step_ops.decode, step_ops.write_tokens = step_decode, step_write


def _time_attention_layers(calls: dict) -> None:
    """Time every call of vLLM's attention layer (``Attention.forward``: the KV write and the
    attention, all the backend does per layer and step, vLLM's dispatch included)."""
    from vllm.model_executor.layers.attention import attention

    forward = attention.Attention.forward

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        out = forward(self, *args, **kwargs)
        calls.setdefault("attention layer", []).append(time.perf_counter() - start)
        return out

    attention.Attention.forward = timed


def run_variant(variant: str, context: int, new_tokens: int, repeats: int) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import seqkv_fixtures as fixtures

    backend = "auto" if variant == "auto" else "seqkv"
    llm = LLM(model=str(fixtures.smollm2_dir()), max_model_len=context + new_tokens + 64,
              kv_cache_memory_bytes=256 << 20, additional_config={"kv_cache_backend": backend}, seed=0,
              enforce_eager=True)
    prompt = TokensPrompt(prompt_token_ids=_prompt_ids(context))
    one = SamplingParams(max_tokens=1)
    many = SamplingParams(max_tokens=1 + new_tokens, min_tokens=1 + new_tokens, temperature=0, ignore_eos=True)
    llm.generate([prompt], one, use_tqdm=False)  # prefill cached
    calls: dict[str, list[float]] = {}
    last: dict[str, tuple] = {}
    if backend == "seqkv":
        _stub_ops(variant, calls, last)
    _time_attention_layers(calls)
    llm.generate([prompt], many, use_tqdm=False)  # warm-up of the variant
    calls.clear()
    per_token = []
    for _ in range(repeats):
        start = time.perf_counter()
        llm.generate([prompt], one, use_tqdm=False)
        middle = time.perf_counter()
        llm.generate([prompt], many, use_tqdm=False)
        per_token.append(((time.perf_counter() - middle) - (middle - start)) / new_tokens)
    replay = {}
    for name in ("decode wrapper", "write wrapper"):  # the last call again, back to back: warm
        if name in last:
            fn, args, kwargs = last[name]
            times = []
            for _ in range(200):
                start = time.perf_counter()
                fn(*args, **kwargs)  # a write replays the same token into the same slot
                times.append(time.perf_counter() - start)
            replay[name] = round(statistics.median(times[20:]) * 1e6, 1)
    return {"ms_per_token": [round(t * 1e3, 3) for t in per_token],
            "replay_warm_median_us": replay,
            "median_ms_per_token": round(statistics.median(per_token) * 1e3, 3),
            "call_median_us": {name: round(statistics.median(t) * 1e6, 1) for name, t in calls.items()},
            "calls": {name: len(t) for name, t in calls.items()}}


def main(argv: list[str] | None = None) -> None:
    from benchmarks.report import run_header, write_json
    from benchmarks.tpot import uptime

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/decode_step_parts.json"))
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one child process
    args = parser.parse_args(argv)
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args.variant, args.context, args.tokens, args.repeats)), flush=True)
        return
    record = run_header("benchmarks.decode_step_parts", argv)
    record.update(context=args.context, tokens=args.tokens, repeats=args.repeats, uptime_at_start=uptime())
    results = {}
    for variant in VARIANTS:
        child = subprocess.run([sys.executable, "-m", "benchmarks.decode_step_parts", "--variant", variant,
                                "--context", str(args.context), "--tokens", str(args.tokens),
                                "--repeats", str(args.repeats)], capture_output=True, text=True, check=False)
        line = next((x for x in child.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"variant {variant!r} failed:\n{child.stderr[-3000:]}")
        results[variant] = json.loads(line[len("RESULT "):])
        print(variant, results[variant]["median_ms_per_token"], "ms/token", results[variant]["call_median_us"],
              results[variant]["replay_warm_median_us"], flush=True)
    record.update(uptime_at_end=uptime(), variants=results)
    write_json(args.json, record)


if __name__ == "__main__":
    main()
