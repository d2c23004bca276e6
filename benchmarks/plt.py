"""`python -m benchmarks.plt`: cold tiers, token tier and placement policy, measured.

Writes benchmarks/plt.json. Per model (SmolLM2-135M with vLLM's CPU block of 128 tokens,
the real model and what the connector holds; the tiny trained Llama fixture with blocks of
16; ``--no-smollm2`` skips SmolLM2): text from the pydocs test split (priors fitted on
train); the cold-tier coders' bits per element, encode and decode time and bit-exactness
(the code-level coder of :mod:`vllm_seqkv.tiers.code_model`, without its prior, the byte-level
``ColdCodec`` with and without a fitted prior); the token tier's bits per token against the
model's cross-entropy; restore of a block from the CPU-RAM, disk, Redis (a local server, when
``redis-server`` or ``valkey-server`` is installed) and token tiers against recomputing it
(a transformers prefill, fp32, same process). The top-level figures are SmolLM2's (the tiny
model's when it is skipped); every model's record is under ``models``. Then the placement
policy against LRU on the multi-session trace at equal blocks (the policy alone), and seqkv
pages against vLLM's stock bf16 pages in equal bytes (codec and policy together).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch


def coder_figures(coder, blocks: list[bytes], elements: int) -> dict:
    t0 = time.perf_counter()
    coded = [coder.encode(b) for b in blocks]
    t1 = time.perf_counter()
    exact = all(coder.decode(e, len(b)) == b for e, b in zip(coded, blocks))
    t2 = time.perf_counter()
    return {"bits_per_element": sum(map(len, coded)) * 8 / (elements * len(blocks)),
            "encode_s_per_block": (t1 - t0) / len(blocks),
            "decode_s_per_block": (t2 - t1) / len(blocks), "bit_exact": exact}


def restore_figures(tiers: dict, blocks: list[bytes], recompute_s: float) -> dict:
    """Per tier: time to load (fetch + decode) a block, against recomputing it."""
    out = {}
    for name, tier in tiers.items():
        for i, b in enumerate(blocks):
            tier.save(i, b)
        t0 = time.perf_counter()
        ok = all(tier.load(i) == b for i, b in enumerate(blocks))
        per_block = (time.perf_counter() - t0) / len(blocks)
        out[name] = {"restore_s_per_block": per_block, "bit_exact": ok,
                     "speedup_vs_recompute": recompute_s / per_block}
    return out


def measure_model(model_dir: Path, block_tokens: int, test_tokens: int, redis_url: str | None) -> dict:
    from transformers import AutoTokenizer

    import seqkv_fixtures as fixtures
    from vllm_seqkv.tiers.coders import ColdCodec, TokenCoder
    from vllm_seqkv.calibrate import codec_for_model
    from vllm_seqkv.tiers.cold_prior import code_model_for, model_blocks
    from vllm_seqkv.tiers import DiskTier, MemoryTier, RedisTier, TokenTier

    tok = AutoTokenizer.from_pretrained(model_dir)
    train = tok(fixtures.corpus_path("train").read_text()[:200_000])["input_ids"][:4096]
    test = tok(fixtures.corpus_path("test").read_text()[:100_000])["input_ids"][:test_tokens]
    kv = codec_for_model(model_dir, "seqkv-3")
    btr, cols, elems = model_blocks(model_dir, train, block_tokens, kv)
    bte, _, _ = model_blocks(model_dir, test, block_tokens, kv)
    codec = code_model_for(model_dir, btr, kv)
    rec: dict = {"model": model_dir.name, "block_size": block_tokens, "test_tokens": len(test),
                 "hot_bits_per_element": sum(map(len, bte)) * 8 / (elems * len(bte)),
                 "hot_bytes_per_block": sum(map(len, bte)) / len(bte)}
    rec["coders"] = {name: coder_figures(c, bte, elems) for name, c in (
        ("code_model", codec), ("code_model_no_prior", code_model_for(model_dir, None, kv)),
        ("byte_codec", ColdCodec.fit(btr, cols)), ("byte_codec_uniform_prior", ColdCodec(cols)))}
    rec["cold_bits_per_element"] = rec["coders"]["code_model"]["bits_per_element"]

    coder = TokenCoder(model_dir)
    t0 = time.perf_counter()
    payload = coder.encode(test)
    t_enc = time.perf_counter() - t0
    ce, _ = coder.cross_entropy_bits(test)
    rec["token_tier_bits_per_token"] = len(payload) * 8 / len(test)
    rec["model_cross_entropy_bits_per_token"] = ce
    rec["token_tier_over_cross_entropy"] = rec["token_tier_bits_per_token"] / ce
    rec["token_tier_raw_id_bits_per_token"] = math.log2(coder.vocab)

    model = coder.model  # the same fp32 model, loaded once
    x = torch.tensor([test])
    with torch.inference_mode():
        model(input_ids=x)
        reps = 3
        t0 = time.perf_counter()
        for _ in range(reps):
            model(input_ids=x)
        recompute = (time.perf_counter() - t0) / reps / (len(test) / block_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        tiers = {"cpu": MemoryTier(codec), "disk": DiskTier(tmp, codec)}
        if redis_url is not None:
            tiers["redis"] = RedisTier(redis_url, codec, prefix=model_dir.name.encode() + b":")
        speed = restore_figures(tiers, bte, recompute)
    tt = TokenTier(coder)
    tt.save_tokens(0, test)
    t0 = time.perf_counter()
    ok = tt.load_tokens(0) == test
    per_block = (time.perf_counter() - t0) / (len(test) / block_tokens) + recompute
    speed["token"] = {"restore_s_per_block": per_block, "bit_exact": ok,
                      "speedup_vs_recompute": recompute / per_block,
                      "encode_s_per_token": t_enc / len(test)}
    rec["recompute_s_per_block"] = recompute
    rec["restore_speedup_vs_recompute"] = {k: v["speedup_vs_recompute"] for k, v in speed.items()}
    rec["restore"] = speed
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512, help="test tokens of the tiny model")
    ap.add_argument("--smollm2-tokens", type=int, default=1024)
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--out", default="benchmarks/plt.json")
    ap.add_argument("--no-smollm2", action="store_true", help="skip SmolLM2")
    args = ap.parse_args(argv)
    import seqkv_fixtures as fixtures
    from vllm_seqkv.plt.policy import CostModel, LRUPolicy, OraclePolicy, PLTPolicy, simulate
    from seqkv_fixtures.redis_server import local_redis_server, redis_binary
    from benchmarks.traces import TraceConfig, generate

    exe = redis_binary()
    with contextlib.ExitStack() as stack:
        redis_url = None
        if exe is not None:
            redis_url = stack.enter_context(local_redis_server(exe, Path(stack.enter_context(
                tempfile.TemporaryDirectory()))))["url"]
        models = {"tiny": measure_model(fixtures.tiny_model_dir(), 16, args.tokens, redis_url)}
        if not args.no_smollm2:
            models["smollm2"] = measure_model(fixtures.smollm2_dir(), 128, args.smollm2_tokens,
                                              redis_url)
    top = models.get("smollm2", models["tiny"])
    res: dict = {k: top[k] for k in (
        "model", "block_size", "hot_bits_per_element", "cold_bits_per_element",
        "token_tier_bits_per_token", "model_cross_entropy_bits_per_token",
        "token_tier_over_cross_entropy", "recompute_s_per_block", "restore_speedup_vs_recompute")}
    res["redis_tier"] = "local server" if redis_url else "not measured (no redis-server)"
    res["models"] = models

    # policy vs LRU on the multi-session trace, equal memory (blocks of equal size)
    trace = generate(TraceConfig(requests=args.requests))
    cost = CostModel(block_bytes=models["tiny"]["hot_bytes_per_block"])  # the trace's: 16 tokens
    sims = []
    for cap in (500, 1000, 2000, 4000):
        a = simulate(trace, cap, LRUPolicy(), cost=cost)
        b = simulate(trace, cap, PLTPolicy(cost), cost=cost)
        o = simulate(trace, cap, OraclePolicy(trace), cost=cost)
        sims.append({"capacity_blocks": cap, "bytes_held": cap * cost.block_bytes,
                     "hit_rate_lru": a.hit_rate, "hit_rate_plt": b.hit_rate,
                     "hit_rate_oracle": o.hit_rate,
                     "saved_prefill_s_lru": a.saved_prefill_s,
                     "saved_prefill_s_plt": b.saved_prefill_s,
                     "saved_prefill_s_oracle": o.saved_prefill_s})
    res["policy"] = sims
    # every capacity, not a chosen one; the oracle (Belady, reads the future) is the headroom
    for name in ("plt", "lru", "oracle"):
        res[f"hit_rate_{name}"] = {str(r["capacity_blocks"]): r[f"hit_rate_{name}"] for r in sims}
    res["hit_rate_infinite_cache"] = simulate(trace, 10**9, LRUPolicy(), cost=cost).hit_rate
    # the codec and the policy together: vLLM's stock prefix cache (bf16 pages, LRU) against
    # seqkv pages (LRU, and the PLT policy) in the same bytes
    per_bf16 = 16 / models["tiny"]["hot_bits_per_element"]
    res["equal_bytes_vs_bf16"] = [
        {"bf16_blocks": r["capacity_blocks"], "seqkv_blocks": int(r["capacity_blocks"] * per_bf16),
         "hit_rate_bf16_lru": r["hit_rate_lru"],
         "hit_rate_seqkv_lru": simulate(trace, int(r["capacity_blocks"] * per_bf16), LRUPolicy(),
                                        cost=cost).hit_rate,
         "hit_rate_seqkv_plt": simulate(trace, int(r["capacity_blocks"] * per_bf16), PLTPolicy(cost),
                                        cost=cost).hit_rate}
        for r in sims]
    res["trace_requests"] = len(trace)
    res["machine"] = f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    res["date"] = datetime.date.today().isoformat()
    res["command"] = "python -m benchmarks.plt " + " ".join(argv or sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():  # keep the records of connector_bench (vllm_restore) and plt.replay
        old = json.loads(out.read_text())
        res.update({k: old[k] for k in ("vllm_restore", "connector_eviction") if k in old})
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
