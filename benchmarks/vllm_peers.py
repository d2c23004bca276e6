"""The ruler's peers through the real vLLM engine: vLLM's own KV dtypes and seqkv presets.

Each peer is one in-process CPU engine with the same KV budget, prefix caching off:

- ``auto`` (vLLM's bf16 cache: the reference of this path), ``fp8_e4m3`` / ``fp8_e5m2`` (and
  any other ``--kv-cache-dtype``), and seqkv presets by name (``--kv-cache-backend seqkv``).

Measured per peer, against ``auto`` in the same run:

- long suite: the ruler's windows of each text, NLL from prompt log-probabilities (the serving
  path), Δppl in all and per position bucket;
- chat suite: the exact model's reference answers scored through the engine (teacher-forced
  Δppl; KL needs full distributions, which vLLM does not return: not reported); answers the
  engine writes itself (greedy and T=1 with the ruler's seeds), scored by the exact fp32 model,
  as a ratio to ``auto``'s answers, and greedy agreement with ``auto``.

A dtype whose output is garbage on CPU (vLLM accepts some that do not work there) is recorded
with its figures (and ``garbage: true`` when its long-suite perplexity is over 10x ``auto``'s),
never dropped.
"""

from __future__ import annotations

import gc
import math
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

GARBAGE_RATIO = 10.0
KV_BYTES = 256 << 20


def peer_records(model, settings, state: dict | None) -> list[dict]:
    """Records of every peer in ``settings.vllm_peers`` (and ``auto``); ``state``: the chat
    suite's prompts and reference answers (:func:`benchmarks.chat.prepare`), or None."""
    from benchmarks import chat
    from benchmarks.data import windows
    from benchmarks.quality import POSITION_BUCKETS, bucket_name

    texts = [settings.text, *settings.extra_texts]
    long_windows = {str(t): [w[:-1].tolist() for w in windows(settings.model_dir, t, settings.context,
                                                                  settings.tokens)] for t in texts}
    peers = ["auto", *[p for p in settings.vllm_peers if p != "auto"]]
    runs = {}
    for peer in tqdm(peers, desc="vLLM peers", unit="engine"):
        runs[peer] = run_peer(settings, peer, long_windows, state)
    base = runs["auto"]
    cfg = model.config
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    exact_scores = {}
    if state is not None:
        exact_scores = {mode: chat.score_by_exact(model, answers)[mode]
                        for mode, answers in _answers(base["free"], state).items()}
    records = []
    for peer, run in runs.items():
        for text, nll in run["long"].items():
            ref = base["long"][text]
            record = {"codec": f"vllm:{peer}", "suite": "long", "path": "vllm", "text": text,
                      "context": settings.context, "tokens": sum(len(x) for x in nll),
                      "ppl": _ppl(nll), "ppl_ref": _ppl(ref), "model": cfg.name, "date": date,
                      "command": settings.command, **peer_cost(peer, cfg, settings.context, settings.model_dir)}
            record["delta_ppl_pct"] = 100.0 * (record["ppl"] / record["ppl_ref"] - 1.0)
            record["garbage"] = record["ppl"] > GARBAGE_RATIO * record["ppl_ref"]
            record["delta_ppl_pct_by_position"] = {
                bucket_name(b): 100.0 * (math.exp(_mean_slice(nll, b) - _mean_slice(ref, b)) - 1.0)
                for b in POSITION_BUCKETS if _count_slice(nll, b)}
            records.append(record)
        if state is None:
            continue
        tf, ref_tf = run["chat_tf"], base["chat_tf"]
        record = {"codec": f"vllm:{peer}", "suite": "chat", "path": "vllm", "text": str(chat.SUITE_PATH),
                  "conversations": len(state["prompts"]), "model": cfg.name, "date": date,
                  "command": settings.command, "chat_kl": None,
                  **peer_cost(peer, cfg, round(state["mean_len"]), settings.model_dir)}
        record["chat_delta_ppl_pct"] = 100.0 * (_ppl(tf) / _ppl(ref_tf) - 1.0)
        for mode in ("greedy", "t1"):
            picks = [i for i, a in enumerate(state["reference"]) if a.mode == mode]
            if picks:
                record[f"chat_{mode}_delta_ppl_pct"] = 100.0 * (
                    _ppl([tf[i] for i in picks]) / _ppl([ref_tf[i] for i in picks]) - 1.0)
        scores = {mode: chat.score_by_exact(model, answers)[mode]
                  for mode, answers in _answers(run["free"], state).items()}
        for mode, key in (("greedy", "free_greedy_ppl_ratio"), ("t1", "free_t1_ppl_ratio")):
            if mode in scores:
                record[key], record[key + "_se"] = chat.ratio_se(scores[mode], exact_scores[mode])
        record["greedy_agreement"] = chat.agreement(base["free"]["greedy"], run["free"]["greedy"])
        records.append(record)
    return records


def run_peer(settings, peer: str, long_windows: dict[str, list[list[int]]], state: dict | None) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = {}
    if peer.startswith("seqkv"):
        kwargs["additional_config"] = {"kv_cache_backend": "seqkv", "seqkv": {"preset": peer}}
    else:
        kwargs["kv_cache_dtype"] = peer
    longest = max([len(w) for ws in long_windows.values() for w in ws]
                  + [len(a.prompt) + len(a.tokens) for a in (state or {}).get("reference", [])] + [0])
    max_new = settings.chat.max_new_tokens if settings.chat is not None else 0
    llm = LLM(model=str(settings.model_dir), max_model_len=longest + max_new + 64,
              kv_cache_memory_bytes=KV_BYTES, seed=0, enable_prefix_caching=False, **kwargs)
    try:
        scoring = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
        out = {"long": {}}
        for text, ws in long_windows.items():
            results = llm.generate([TokensPrompt(prompt_token_ids=w) for w in ws], scoring, use_tqdm=False)
            out["long"][text] = [_prompt_nll(r, 1) for r in results]
        if state is None:
            return out
        sequences = [a.prompt.tolist() + a.tokens for a in state["reference"]]
        results = llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], scoring, use_tqdm=False)
        out["chat_tf"] = [_prompt_nll(r, a.prompt.numel()) for r, a in zip(results, state["reference"])]
        prompts = [TokensPrompt(prompt_token_ids=p.tolist()) for _, p in state["prompts"]]
        stops = list(state["stop_ids"])
        greedy = SamplingParams(max_tokens=max_new, temperature=0, stop_token_ids=stops)
        out["free"] = {"greedy": [list(r.outputs[0].token_ids)
                                  for r in llm.generate(prompts, greedy, use_tqdm=False)]}
        from benchmarks.chat import sample_seed

        for i in range(settings.chat.samples):
            params = [SamplingParams(max_tokens=max_new, temperature=1.0, seed=sample_seed(settings.chat, n, i),
                                     stop_token_ids=stops) for n in range(len(prompts))]
            sampled = [list(r.outputs[0].token_ids) for r in llm.generate(prompts, params, use_tqdm=False)]
            out["free"].setdefault("t1", []).extend(sampled)
        return out
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def _answers(free: dict[str, list[list[int]]], state: dict) -> dict:
    from benchmarks.chat import Answer

    prompts = state["prompts"]
    answers = {}
    for mode, token_lists in free.items():
        answers[mode] = [Answer(prompts[i % len(prompts)][0], prompts[i % len(prompts)][1], t, mode)
                         for i, t in enumerate(token_lists) if t]
    return answers


def _prompt_nll(result, first: int) -> list[float]:
    """NLL of prompt tokens ``first..`` from vLLM's prompt log-probabilities."""
    ids, logprobs = result.prompt_token_ids, result.prompt_logprobs
    return [-logprobs[i][ids[i]].logprob for i in range(max(first, 1), len(ids))]


def _ppl(nll_lists: list[list[float]]) -> float:
    total = sum(sum(x) for x in nll_lists)
    return math.exp(total / max(sum(len(x) for x in nll_lists), 1))


def _positions(nll_lists, bucket):
    low, high = bucket
    # prompt NLL lists start at position 1 (the target's position); ruler buckets index the
    # context end t = target position - 1
    return [v for x in nll_lists for v in x[low:high]]


def _mean_slice(nll_lists, bucket) -> float:
    values = _positions(nll_lists, bucket)
    return sum(values) / max(len(values), 1)


def _count_slice(nll_lists, bucket) -> int:
    return len(_positions(nll_lists, bucket))


def peer_cost(peer: str, cfg, context: int, model_dir: Path) -> dict:
    """Stored and read bits per element of a vLLM peer: its cache dtype (all read inside vLLM's
    attention kernel, nothing transient), or the seqkv preset's own definition."""
    if peer.startswith("seqkv"):
        from vllm_seqkv import calibrate
        from benchmarks.quality import _decode_cost
        from vllm_seqkv.codec import make_codec

        codec = make_codec(peer, calibrate.load_for_model(Path(model_dir), peer))
        return _decode_cost(codec, cfg, context)
    bits = 8.0 if peer.startswith("fp8") or peer.startswith("int8") else 16.0
    return {"bits_per_element": bits, "decode_read_bits_per_element": bits, "transient_bytes_per_token": 0}


