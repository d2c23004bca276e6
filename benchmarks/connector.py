"""`python -m benchmarks.connector`: cold-tier restore vs recompute, through vLLM.

One engine (seqkv pages, a cold tier, a KV budget of a few dozen blocks), one process, CPU.
For each of ``--prompts`` prompts P (``--tokens`` tokens from the held-out split):

1. P runs once (``max_tokens=1``): time to first token with every block prefilled
   (**recompute**); its blocks are saved to the cold tier when it finishes;
2. other prompts run until P's blocks have left vLLM's prefix cache;
3. P runs again: the connector restores its full blocks from the tier, vLLM prefills the
   rest (**restore**); ``num_cached_tokens`` says how many tokens came from the tier.

Reported: both times to first token, their ratio, the connector's own time to decode and
copy the blocks (read from the worker), the recompute time of the same number of tokens
(pro rata of step 1), the bytes the tier holds per element.

Then the engine loop during a restore: a bystander request decodes ``--bystander-tokens``
tokens, stepped one engine step at a time; after a few of its tokens, the first prompt
(evicted again) arrives and is restored from the tier. Reported: the bystander's slowest
step while the restore runs, its median step, and the connector's load time of that
restore (a load on the engine thread would add all of it to one step).

Last, in the same process, the fastest prefill a user has: a second engine with vLLM's own
cache (``kv_cache_backend: auto``, bf16 pages, prefix caching on, same model length and eager
mode, a 256 MiB bf16 cache) runs the same prompts P once each after a warm-up (none of them in its prefix cache):
**auto recompute**, against which the restore is compared too (TTFT, and the pro rata time of
the restored tokens vs the connector's load). Merged into benchmarks/plt.json under
``vllm_restore``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _worker_stats(self):
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    w = get_kv_transfer_group().worker
    w.saver.flush(60)
    return {**w.worker_stats(), "page_bytes": w.store.page_bytes, "heads": w.store.heads,
            "layers": len(w.store.pages)}


def engine_block_bytes(model_dir, block_size: int = 128) -> tuple[int, int]:
    """Bytes of one KV block of the seqkv pages (default preset) for this model, head size."""
    from transformers import AutoConfig

    from vllm_seqkv.codec.rope import rope_theta
    from vllm_seqkv.config import SeqKVConfig
    from vllm_seqkv.integration.engine_codec import EngineCodec

    hf = AutoConfig.from_pretrained(model_dir)
    heads, hd = hf.num_key_value_heads, hf.hidden_size // hf.num_attention_heads
    codec = EngineCodec(SeqKVConfig(kv_cache_backend="seqkv"), str(model_dir), heads, hd, rope_theta(hf))
    return hf.num_hidden_layers * heads * block_size * codec.slot_bytes, hd


def seqkv_budget_for_blocks(model_dir, blocks: int, max_model_len: int, block_size: int = 128) -> int:
    """``kv_cache_memory_bytes`` that gives a seqkv engine (default preset, CPU) exactly ``blocks``
    blocks: their pages plus the fixed memory seqkv takes from the budget (see
    :mod:`vllm_seqkv.integration.fixed_memory`)."""
    from transformers import AutoConfig

    from vllm_seqkv.codec.rope import rope_theta
    from vllm_seqkv.config import SeqKVConfig
    from vllm_seqkv.integration.engine_codec import EngineCodec
    from vllm_seqkv.integration.fixed_memory import fixed_memory_of

    hf = AutoConfig.from_pretrained(model_dir)
    heads, hd = hf.num_key_value_heads, hf.hidden_size // hf.num_attention_heads
    codec = EngineCodec(SeqKVConfig(kv_cache_backend="seqkv"), str(model_dir), heads, hd, rope_theta(hf),
                        kv_dtype=hf.dtype)  # the model's dtype, as vLLM's dtype "auto" serves it
    fixed = fixed_memory_of(codec, hf.num_hidden_layers, max_model_len)
    per_block = hf.num_hidden_layers * heads * block_size * codec.slot_bytes
    return fixed.budget_for(blocks, per_block, whole_budget=True, kv_on_host=True)


def engine_loop_during_restore(llm, restored, bystander, floods, bystander_tokens: int, run) -> dict:
    """Step the engine by hand: ``bystander`` decodes; after 4 of its steps ``restored`` (in
    the tier, not in vLLM's prefix cache after ``floods``) arrives. Step times while the
    bystander runs, split by whether the restore was in flight."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    for f in floods:  # the restored prompt's blocks leave vLLM's prefix cache
        run(f)
    before = llm.collective_rpc(_worker_stats)[0]
    engine = llm.llm_engine
    engine.add_request("bystander", TokensPrompt(prompt_token_ids=bystander[:64]),
                       SamplingParams(max_tokens=bystander_tokens, temperature=0, ignore_eos=True))
    steps, restoring, cached = [], False, None
    while engine.has_unfinished_requests():
        if len(steps) == 4:
            engine.add_request("restored", TokensPrompt(prompt_token_ids=restored),
                               SamplingParams(max_tokens=1, temperature=0))
            restoring = True
        t0 = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t0
        for o in outs:
            if o.request_id == "restored" and o.finished:
                cached = o.num_cached_tokens
        bystander_running = not any(o.request_id == "bystander" and o.finished for o in outs)
        steps.append((dt, restoring))
        if cached is not None:
            restoring = False
        if not bystander_running:
            break
    while engine.has_unfinished_requests():
        engine.step()
    after = llm.collective_rpc(_worker_stats)[0]
    during = [dt for dt, r in steps if r]
    quiet = sorted(dt for dt, r in steps[1:] if not r)  # the bystander's prefill excluded
    return {"restored_cached_tokens": cached, "bystander_steps": len(steps),
            "connector_load_s": after["load_s"] - before["load_s"],
            "max_step_s_during_restore": max(during) if during else None,
            "median_step_s_otherwise": quiet[len(quiet) // 2] if quiet else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    ap.add_argument("--tier", choices=["cpu", "disk", "redis"], default="cpu",
                    help="redis: a local redis-server/valkey-server started for the run")
    ap.add_argument("--tokens", type=int, default=1100)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--blocks", type=int, default=24, help="KV blocks of the engine")
    ap.add_argument("--bystander-tokens", type=int, default=48)
    ap.add_argument("--out", default="benchmarks/plt.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from transformers import AutoTokenizer

    import seqkv_fixtures as fixtures

    d = fixtures.tiny_model_dir() if args.model == "tiny" else fixtures.smollm2_dir()
    ids = AutoTokenizer.from_pretrained(d)(fixtures.corpus_path("test").read_text()[:400_000])["input_ids"]
    tmp = tempfile.mkdtemp(prefix="seqkv-cold-")
    cold = {"kind": args.tier, "capacity_bytes": 1 << 30}
    if args.tier == "disk":
        cold["path"] = tmp
    with contextlib.ExitStack() as stack:
        if args.tier == "redis":
            from seqkv_fixtures.redis_server import local_redis_server, redis_binary

            exe = redis_binary()
            if exe is None:
                raise SystemExit("--tier redis needs redis-server or valkey-server on PATH")
            cold["url"] = stack.enter_context(local_redis_server(exe, Path(tmp)))["url"]
        return measure(args, argv, d, ids, cold)


def auto_recompute(d, ids, prompts: list[list[int]]) -> list[float]:
    """TTFT (s) of each prompt in a fresh ``auto`` engine (vLLM's bf16 cache, prefix caching
    on), after a warm-up prompt that shares no block with them: a full prefill each."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(d), max_model_len=2048, seed=0, enforce_eager=True, enable_prefix_caching=True,
              kv_cache_memory_bytes=256 << 20, additional_config={"kv_cache_backend": "auto"})
    one = SamplingParams(max_tokens=1, temperature=0)
    try:
        llm.generate([TokensPrompt(prompt_token_ids=ids[-len(prompts[0]):])], one, use_tqdm=False)
        times = []
        for p in prompts:
            t0 = time.perf_counter()
            out = llm.generate([TokensPrompt(prompt_token_ids=p)], one, use_tqdm=False)[0]
            times.append(time.perf_counter() - t0)
            if out.num_cached_tokens:
                raise RuntimeError(f"auto engine found {out.num_cached_tokens} cached tokens: not a recompute")
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
    return times


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


def measure(args, argv, d, ids, cold: dict) -> int:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    uptime_start = uptime()
    _, hd = engine_block_bytes(d)
    llm = LLM(model=str(d), max_model_len=2048, seed=0, enforce_eager=True,
              kv_cache_memory_bytes=seqkv_budget_for_blocks(d, args.blocks, 2048),
              additional_config={"kv_cache_backend": "seqkv", "seqkv": {"cold_tier": cold}})
    one = SamplingParams(max_tokens=1, temperature=0)

    def ttft(prompt):
        t0 = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], one, use_tqdm=False)[0]
        return time.perf_counter() - t0, out.num_cached_tokens

    n = args.tokens
    ttft(ids[-n:])  # warm-up
    flood_per = -(-n // 128)
    rows = []
    for i in range(args.prompts):
        p = ids[i * 2 * n:i * 2 * n + n]
        t_rec, cached0 = ttft(p)
        before = llm.collective_rpc(_worker_stats)[0]
        for j in range(args.blocks // flood_per + 2):  # cycle every block of the engine
            start = (2 * args.prompts + i * 8 + j) * n
            ttft(ids[start:start + n])
        mid = llm.collective_rpc(_worker_stats)[0]
        t_res, cached = ttft(p)
        after = llm.collective_rpc(_worker_stats)[0]
        load_s = after["load_s"] - mid["load_s"]
        rows.append({"recompute_ttft_s": t_rec, "restore_ttft_s": t_res, "cached_tokens": cached,
                     "cached_tokens_first_run": cached0, "connector_load_s": load_s,
                     "recompute_s_of_restored_tokens": t_rec * cached / n,
                     "saved_blocks_before": before["saved_blocks"]})
        print(json.dumps(rows[-1]), flush=True)
    stall = engine_loop_during_restore(llm, ids[:n], ids[-3 * n:-2 * n],
                                       [ids[(40 + j) * n:(41 + j) * n]
                                        for j in range(args.blocks // flood_per + 2)],
                                       args.bystander_tokens, ttft)
    print(json.dumps(stall), flush=True)
    stats = llm.collective_rpc(_worker_stats)[0]
    llm.llm_engine.engine_core.shutdown()
    auto_times = auto_recompute(d, ids, [ids[i * 2 * n:i * 2 * n + n] for i in range(args.prompts)])
    for row, t_auto in zip(rows, auto_times):
        row["auto_recompute_ttft_s"] = t_auto
        row["auto_recompute_s_of_restored_tokens"] = t_auto * row["cached_tokens"] / n
    print(json.dumps({"auto_recompute_ttft_s": auto_times}), flush=True)

    def mean(k):
        return sum(r[k] for r in rows) / len(rows)

    elements = stats["tier_blocks"] * stats["layers"] * stats["heads"] * 128 * hd * 2
    res = {
        "model": d.name, "tier": args.tier, "prompt_tokens": n, "block_size": 128,
        "prompts": len(rows), "runs": rows,
        "cached_tokens": mean("cached_tokens"),
        "recompute_ttft_s": mean("recompute_ttft_s"), "restore_ttft_s": mean("restore_ttft_s"),
        "ttft_speedup": mean("recompute_ttft_s") / mean("restore_ttft_s"),
        "connector_load_s_per_block": mean("connector_load_s") / (mean("cached_tokens") / 128),
        "restore_speedup_vs_recompute": mean("recompute_s_of_restored_tokens") / mean("connector_load_s"),
        "auto_recompute_ttft_s": mean("auto_recompute_ttft_s"),
        "ttft_speedup_vs_auto_recompute": mean("auto_recompute_ttft_s") / mean("restore_ttft_s"),
        "restore_speedup_vs_auto_recompute": mean("auto_recompute_s_of_restored_tokens") / mean("connector_load_s"),
        "save_s_per_block": stats["save_s"] / max(stats["saved_blocks"], 1),
        "engine_loop_copy_s_per_block": stats["copy_s"] / max(stats["saved_blocks"], 1),
        "tier_bits_per_element": stats["tier_bytes"] * 8 / elements if elements else None,
        "hot_bits_per_element": stats["tier_raw_bytes"] * 8 / elements if elements else None,
        "engine_loop_during_restore": stall,
        "machine": f"{os.cpu_count()} CPUs",
        "uptime_at_start": uptime_start, "uptime_at_end": uptime(),
        "date": datetime.date.today().isoformat(),
        "command": "python -m benchmarks.connector " + " ".join(argv or sys.argv[1:]),
    }
    print(json.dumps(res, indent=2))
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    data.setdefault("vllm_restore", {})[f"{args.model}/{args.tier}"] = res
    out.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
