"""Which architectures seqkv serves, measured through the real CPU vLLM engine.

`python -m benchmarks.models [--only NAME ...] [--json benchmarks/models.json]`

For each small offline model of seqkv_fixtures/architectures.py (plus the tiny test
Llama as the default-RoPE reference): one ``auto`` and one ``seqkv`` engine (default preset,
its default calibration from ``calibrate.ensure``) with the same ``kv_cache_memory_bytes``;
records vLLM's KV token count ratio, greedy agreement on fixed prompts (vllm_path's measure)
and the perplexity delta on held-out text (prompt log-probabilities), or, for a model seqkv
refuses, the refusal. ``delta_ppl_pct`` only for trained weights (the RoPE variants and Mistral
are the trained tiny model under another config; GLM-4 is trained here with the tiny model's
recipe, :data:`TRAINING_STEPS`; the other layouts have random weights: plumbing only, null;
Gemma-3 with a 4k vocabulary, and again with its real 262k rows of embedding and logits on
the same 4k-token tokenizer). ``fixed_bytes``:
bytes of the KV budget seqkv keeps for its memory outside the pages
(``seqkv_fixed_bytes_taken_from_kv_budget``: token table, codec constants, kernel params,
RoPE tables and the sink table's bound at the engine's block count; see
vllm_seqkv/integration/fixed_memory.py), with every part in ``fixed_bytes_parts``; so
``capacity_ratio`` (vLLM's own token counts) is net of it, and ``capacity_ratio_pages`` is the
ratio in the budget's share left to the pages. Writes one entry per architecture, replacing
older entries of the same one.
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

KV_BYTES = 32 << 20
CONTEXT = 512
WINDOWS = 2
ROWS = {  # architecture label -> (fixture name or "tiny", trained weights); in measuring order
    "LlamaForCausalLM (RoPE llama3)": ("rope-llama3", True),
    "LlamaForCausalLM (RoPE yarn)": ("rope-yarn", True),
    "MistralForCausalLM (sliding window 64, all layers)": ("mistral", True),
    "Gemma3ForCausalLM (interleaved sliding/global)": ("gemma3", False),
    "Gemma3ForCausalLM (interleaved sliding/global, 262k vocabulary)": ("gemma3-262k", False),
    "Qwen3ForCausalLM (q/k norm)": ("qwen3", False),
    "Qwen2ForCausalLM (QKV bias)": ("qwen2", False),
    "LlamaForCausalLM (MQA, head size 256)": ("mqa256", False),
    "LlamaForCausalLM (default RoPE)": ("tiny", True),
    "LlamaForCausalLM (RoPE linear)": ("rope-linear", True),
    "LlamaForCausalLM (RoPE dynamic)": ("rope-dynamic", True),
    "LlamaForCausalLM (partial rotary 0.5)": ("rope-partial", True),
    "Glm4ForCausalLM (partial interleaved rotary, QKV bias)": ("glm4", True),
}
# fixtures of their own layout trained here (seqkv_fixtures/architectures.py ``steps``: the tiny
# model's recipe and step count) rather than the tiny model's weights under another config
TRAINING_STEPS = {"glm4": 700}


def run_engine(model: Path, backend: str, windows, prompts) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(model), max_model_len=CONTEXT + 64, kv_cache_memory_bytes=KV_BYTES,
              additional_config={"kv_cache_backend": backend}, seed=0, enable_prefix_caching=False)
    try:
        cache = llm.llm_engine.vllm_config.cache_config
        scoring = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
        nll, count = 0.0, 0
        for out in llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], scoring, use_tqdm=False):
            for token_id, logprobs in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
                nll -= logprobs[token_id].logprob
                count += 1
        greedy = SamplingParams(max_tokens=32, temperature=0)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], greedy, use_tqdm=False)
        return {"tokens": cache.num_gpu_blocks * cache.block_size, "ppl": math.exp(nll / count),
                "generations": [list(o.outputs[0].token_ids) for o in outs],
                **(fixed_memory_gauges() if backend == "seqkv" else {})}
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def fixed_memory_gauges() -> dict:
    """The seqkv engine's fixed memory as this process's front-end exports it (/metrics)."""
    from prometheus_client import REGISTRY

    from vllm_seqkv.codec.presets import DEFAULT_PRESET
    from vllm_seqkv.integration.fixed_memory import PARTS

    def gauge(name: str, **labels) -> int:
        return int(REGISTRY.get_sample_value(name, {"preset": DEFAULT_PRESET, **labels}))

    return {"fixed_bytes": gauge("seqkv_fixed_bytes_taken_from_kv_budget"),
            "fixed_bytes_parts": {part: gauge("seqkv_fixed_bytes", part=part) for part in PARTS}}


def refusal_of(model: Path) -> str | None:
    """The start-up refusal seqkv gives the model (None: accepted)."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_seqkv.integration.plugin import register
    from vllm_seqkv.integration.support import UnsupportedModelError

    register()
    try:
        EngineArgs(model=str(model), max_model_len=CONTEXT + 64, kv_cache_memory_bytes=KV_BYTES,
                   additional_config={"kv_cache_backend": "seqkv"}).create_engine_config()
    except UnsupportedModelError as e:
        return str(e)
    return None


def measure(label: str, name: str, trained: bool, command: str) -> dict:
    from transformers import AutoTokenizer

    import seqkv_fixtures as fixtures
    from vllm_seqkv import calibrate
    from benchmarks.vllm_path import agreement, held_out_windows
    from vllm_seqkv.codec.presets import DEFAULT_PRESET
    from seqkv_fixtures import architectures

    model = fixtures.tiny_model_dir() if name == "tiny" else architectures.build(name, TRAINING_STEPS.get(name, 0))
    entry = {"architecture": label, "model": model.name, "served": False, "refusal": None,
             "capacity_ratio": None, "greedy_agreement": None, "delta_ppl_pct": None,
             "fixed_bytes": None, "weights": "trained" if trained else "random",
             "preset": DEFAULT_PRESET, "kv_cache_memory_bytes": KV_BYTES,
             "date": dt.date.today().isoformat(), "command": command}
    calibrate.ensure(model, DEFAULT_PRESET)  # start-up needs it
    refusal = refusal_of(model)
    if refusal is not None:
        entry.update(refusal=refusal)
        return entry
    tok = AutoTokenizer.from_pretrained(model)
    text = fixtures.corpus_path("test").read_text()
    windows = held_out_windows(tok, text, CONTEXT, WINDOWS)
    ids = tok(text[-40_000:])["input_ids"]
    prompts = [ids[i * 400:i * 400 + 64] for i in range(8)]
    runs = {b: run_engine(model, b, windows, prompts) for b in ("auto", "seqkv")}
    ratio = runs["seqkv"]["tokens"] / runs["auto"]["tokens"]
    entry.update(served=True, capacity_ratio=ratio, fixed_bytes=runs["seqkv"]["fixed_bytes"],
                 fixed_bytes_parts=runs["seqkv"]["fixed_bytes_parts"],
                 capacity_ratio_pages=ratio * KV_BYTES / (KV_BYTES - runs["seqkv"]["fixed_bytes"]),
                 greedy_agreement=agreement(runs["auto"]["generations"], runs["seqkv"]["generations"]),
                 ppl_auto=runs["auto"]["ppl"], ppl_seqkv=runs["seqkv"]["ppl"])
    if trained:
        entry["delta_ppl_pct"] = 100 * (runs["seqkv"]["ppl"] / runs["auto"]["ppl"] - 1)
    return entry


def markdown(entries: list[dict]) -> str:
    """The README's supported-models table."""
    def figure(value, form):
        return "—" if value is None else format(value, form)

    rows = ["| architecture | model | served | capacity vs `auto` (pages' share) | greedy agreement | "
            "Δppl | fixed bytes | weights |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for e in entries:
        served = "yes" if e["served"] else f"refused: {e['refusal']}"
        delta = "—" if e["delta_ppl_pct"] is None else f"{e['delta_ppl_pct']:+.1f} %"
        pages = "" if e.get("capacity_ratio_pages") is None else f" ({e['capacity_ratio_pages']:.2f}x)"
        rows.append(f"| {e['architecture']} | {e['model']} | {served} | "
                    f"{figure(e['capacity_ratio'], '.2f')}x{pages} | {figure(e['greedy_agreement'], '.2f')} | "
                    f"{delta} | {figure(e['fixed_bytes'], ',')} | {e.get('weights', '')} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.models")
    parser.add_argument("--only", nargs="*", default=None, help="fixture names (default: all)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/models.json"))
    parser.add_argument("--markdown", action="store_true", help="print the README table of --json")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.json.read_text())))
        return []
    command = "python -m benchmarks.models" + (" " + shlex.join(sys.argv[1:]) if argv is None and sys.argv[1:] else "")
    existing = json.loads(args.json.read_text()) if args.json.exists() else []
    for label, (name, trained) in ROWS.items():
        if args.only and name not in args.only:
            continue
        entry = measure(label, name, trained, command)
        print(json.dumps(entry), flush=True)
        existing = [e for e in existing if e["architecture"] != label] + [entry]
        args.json.write_text(json.dumps(existing, indent=2) + "\n")
    return existing


if __name__ == "__main__":
    main()
