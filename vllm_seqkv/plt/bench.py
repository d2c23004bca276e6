"""`python -m vllm_seqkv.plt.bench`: cold tiers, token tier and placement policy, measured.

Writes benchmarks/plt.json. Model: the tiny trained Llama fixture (the only one fast enough
for per-token range coding on 2 CPU cores); text: pydocs test split (priors fitted on train).
Cold tier: the code-level coder (:mod:`vllm_seqkv.plt.code_model`) and, for comparison, the
byte-level ``ColdCodec``; SmolLM2's cold-tier bits are measured too (``--no-smollm2`` skips).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--out", default="benchmarks/plt.json")
    ap.add_argument("--no-smollm2", action="store_true", help="skip SmolLM2's cold-tier figure")
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_seqkv import fixtures
    from vllm_seqkv.plt.entropy import ColdCodec, TokenCoder
    from vllm_seqkv.plt.kvbytes import code_model_for, model_blocks
    from vllm_seqkv.plt.policy import CostModel, LRUPolicy, OraclePolicy, PLTPolicy, simulate
    from vllm_seqkv.plt.tiers import DiskTier, MemoryTier, TokenTier
    from vllm_seqkv.plt.traces import TraceConfig, generate

    d = fixtures.tiny_model_dir()
    tok = AutoTokenizer.from_pretrained(d)
    train = tok(fixtures.corpus_path("train").read_text()[:200_000])["input_ids"][:4096]
    test = tok(fixtures.corpus_path("test").read_text()[:100_000])["input_ids"][:args.tokens]
    btr, cols, elems = model_blocks(d, train)
    bte, _, _ = model_blocks(d, test)
    byte_codec = ColdCodec.fit(btr, cols)
    codec = code_model_for(d, btr)
    raw = sum(map(len, bte))

    def bits(c, blocks=bte, elements=elems):
        return sum(len(c.encode(b)) for b in blocks) * 8 / (elements * len(blocks))

    res: dict = {
        "model": d.name, "block_size": 16, "test_tokens": len(test),
        "hot_bits_per_element": raw * 8 / (elems * len(bte)),
        "cold_bits_per_element": bits(codec),
        "cold_bits_per_element_no_prior": bits(code_model_for(d, None)),
        "cold_bits_per_element_byte_codec": bits(byte_codec),
        "cold_bits_per_element_byte_codec_uniform_prior": bits(ColdCodec(cols)),
    }
    if not args.no_smollm2:  # 30 layers, vLLM's CPU block of 128 tokens: what the connector holds
        s = fixtures.smollm2_dir()
        stok = AutoTokenizer.from_pretrained(s)
        s_train, s_cols, s_elems = model_blocks(
            s, stok(fixtures.corpus_path("train").read_text()[:200_000])["input_ids"][:4096], 128)
        s_test, _, _ = model_blocks(
            s, stok(fixtures.corpus_path("test").read_text()[:100_000])["input_ids"][:1024], 128)
        res["smollm2"] = {"model": s.name, "block_size": 128, "test_tokens": 1024,
                          "hot_bits_per_element": sum(map(len, s_test)) * 8 / (s_elems * len(s_test))}
        for name, c in (("code_model", code_model_for(s, s_train)),
                        ("code_model_no_prior", code_model_for(s, None)),
                        ("byte_codec", ColdCodec.fit(s_train, s_cols))):
            t0 = time.perf_counter()
            coded = [c.encode(b) for b in s_test]
            t1 = time.perf_counter()
            exact = all(c.decode(e, len(b)) == b for e, b in zip(coded, s_test))
            t2 = time.perf_counter()
            res["smollm2"][name] = {
                "bits_per_element": sum(map(len, coded)) * 8 / (s_elems * len(s_test)),
                "encode_s_per_block": (t1 - t0) / len(s_test),
                "decode_s_per_block": (t2 - t1) / len(s_test), "bit_exact": exact}

    # token tier vs the model's own cross-entropy
    coder = TokenCoder(d)
    ids = test[:args.tokens]
    t0 = time.perf_counter()
    payload = coder.encode(ids)
    t_enc = time.perf_counter() - t0
    ce, _ = coder.cross_entropy_bits(ids)
    res["token_tier_bits_per_token"] = len(payload) * 8 / len(ids)
    res["model_cross_entropy_bits_per_token"] = ce
    res["token_tier_over_cross_entropy"] = res["token_tier_bits_per_token"] / ce
    res["token_tier_raw_id_bits_per_token"] = math.log2(coder.vocab)

    # restore vs recompute, same process: per block of 16 tokens at the end of the context
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    x = torch.tensor([ids])
    with torch.inference_mode():
        model(input_ids=x)
        reps = 5
        t0 = time.perf_counter()
        for _ in range(reps):
            model(input_ids=x)
        recompute_block = (time.perf_counter() - t0) / reps / (len(ids) / 16)
    speed = {}
    with tempfile.TemporaryDirectory() as tmp:
        tiers = {"cpu": MemoryTier(codec), "disk": DiskTier(tmp, codec)}
        for name, tier in tiers.items():
            for i, b in enumerate(bte):
                tier.save(i, b)
            t0 = time.perf_counter()
            ok = all(tier.load(i) == b for i, b in enumerate(bte))
            per_block = (time.perf_counter() - t0) / len(bte)
            speed[name] = {"restore_s_per_block": per_block, "bit_exact": ok,
                           "speedup_vs_recompute": recompute_block / per_block}
        tt = TokenTier(coder)
        tt.save_tokens(0, ids)
        t0 = time.perf_counter()
        ok = tt.load_tokens(0) == ids
        per_block = (time.perf_counter() - t0) / (len(ids) / 16) + recompute_block
        speed["token"] = {"restore_s_per_block": per_block, "bit_exact": ok,
                          "speedup_vs_recompute": recompute_block / per_block,
                          "encode_s_per_token": t_enc / len(ids)}
    res["recompute_s_per_block"] = recompute_block
    res["restore_speedup_vs_recompute"] = {k: v["speedup_vs_recompute"] for k, v in speed.items()}
    res["restore"] = speed

    # policy vs LRU on the multi-session trace, equal memory (blocks of equal size)
    trace = generate(TraceConfig(requests=args.requests))
    cost = CostModel(block_bytes=raw / len(bte))
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
    res["trace_requests"] = len(trace)
    res["machine"] = f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    res["date"] = datetime.date.today().isoformat()
    res["command"] = "python -m vllm_seqkv.plt.bench " + " ".join(argv or sys.argv[1:])
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
