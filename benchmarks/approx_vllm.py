"""`python -m benchmarks.approx_vllm`: approximate prefix reuse as served by vLLM.

The gate of ``python -m benchmarks.approx`` is measured with transformers in fp32; this
runs the served path: one vLLM engine (seqkv pages, a CPU cold tier with
``cold_tier.approximate`` on, the gate of ``benchmarks/approx.json``, a budget that lets every
measured k through), CPU. For each of ``--windows`` held-out windows P of ``--context`` +
``--tail`` tokens and each k of ``--ks``:

1. P runs under tenant salt ``T`` (one tenant per window and k): its blocks go to the tier;
2. P_k = P with k tokens substituted at random positions of its first ``--context`` tokens
   (uniform vocabulary tokens) runs under a fresh salt: every token computed (**exact**);
3. P_k runs under ``approx:T``: the connector serves its first ``--context`` tokens from
   P's blocks (**approximate**, ``num_cached_tokens``), vLLM prefills the tail.

Steps 1-3 run twice, with other salts: plainly (``max_tokens=1``: the times to first token)
and asking for the prompt log-probabilities (top ``--top``: the quality figures). The two
exact prefills also give what prompt log-probabilities cost in a prefill (the PLT's edge
labels, when taken from vLLM). Reported per k:
KL(exact || approximate) over the tail, estimated on the exact run's top tokens plus one
category for the rest of the vocabulary (a token missing from the approximate top gets its
lowest returned log-probability), the change of the
true tail tokens' NLL (Δppl %), how often the most likely next token agrees, the tokens
served from the tier, and both times to first token. Merged into ``benchmarks/approx.json``
under ``vllm`` and written to the section "Approximate prefix reuse through vLLM" of
BENCHMARKS.md; the served KL per k is also written as a gate (``--gate-out``) that
``cold_tier.approximate.gate`` accepts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import sys
import time
from pathlib import Path

from benchmarks.report import replace_section

SECTION = "## Approximate prefix reuse through vLLM"


def tail_logprobs(out, tail: int) -> list[dict[int, float]]:
    """Log-probability dicts of the last ``tail - 1`` prompt tokens (the ones both runs
    compute: the approximate run's first computed position predicts the second tail token)."""
    lps = out.prompt_logprobs[-(tail - 1):]
    if len(lps) != tail - 1 or any(lp is None for lp in lps):
        raise RuntimeError("vLLM returned no prompt log-probabilities for the tail")
    out = [{t: v.logprob for t, v in lp.items()} for lp in lps]
    # NOTE: vLLM 0.32 returns uninitialized values for the positions it took from a cache
    if any(v > 1e-6 or t < 0 for lp in out for t, v in lp.items()):
        raise RuntimeError("prompt log-probabilities of the tail are not computed ones")
    return out


def compare(exact: list[dict[int, float]], approx: list[dict[int, float]], targets: list[int],
            top: int) -> dict:
    kl = dnll = agree = 0.0
    for e, a, t in zip(exact, approx, targets):
        e_top = sorted(e.items(), key=lambda kv: -kv[1])[:top]
        floor = min(a.values())
        p = [math.exp(lp) for _, lp in e_top]
        q = [math.exp(a.get(tok, floor)) for tok, _ in e_top]
        p.append(max(1.0 - sum(p), 1e-12))  # the rest of the vocabulary, one category
        q.append(max(1.0 - sum(q), 1e-12))
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        dnll += a.get(t, floor) - e[t]
        agree += max(a, key=a.get) == e_top[0][0]
    n = len(targets)
    return {"kl_top": kl / n, "dnll": -dnll / n, "top1_agreement": agree / n}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.approx_vllm",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--context", type=int, default=1024, help="tokens served from the tier")
    ap.add_argument("--tail", type=int, default=128)
    ap.add_argument("--ks", default="1,2,4,8")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--blocks", type=int, default=48, help="KV blocks of the engine")
    ap.add_argument("--gate", type=Path, default=Path("benchmarks/approx.json"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/approx.json"))
    ap.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"))
    ap.add_argument("--gate-out", type=Path, default=None, help="quality gate from the served "
                    "KL, mean over windows per k (default for smollm2: "
                    "benchmarks/approx_served_gate.json)")
    args = ap.parse_args(argv)
    if args.context % 128:
        raise SystemExit("--context must be a multiple of the block size (128)")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import seqkv_fixtures as fixtures
    from vllm_seqkv.config import ApproximateReuseConfig
    from benchmarks.connector import seqkv_budget_for_blocks
    from vllm_seqkv.plt.approximate import QualityGate

    d = fixtures.tiny_model_dir() if args.model == "tiny" else fixtures.smollm2_dir()
    gate = args.gate
    if args.model == "tiny":  # plumbing only: a gate naming the tiny model, every k allowed
        gate = Path(os.environ.get("TMPDIR", "/tmp")) / "seqkv-tiny-gate.json"
        QualityGate(d.name, {k: 0.0 for k in range(1, 65)}).save(gate)
    tok = AutoTokenizer.from_pretrained(d)
    vocab = len(tok)
    ids = tok(fixtures.corpus_path("test").read_text()[:600_000])["input_ids"]
    n = args.context + args.tail
    ks = [int(k) for k in args.ks.split(",")]
    cold = {"kind": "cpu", "capacity_bytes": 1 << 30,
            "approximate": {"gate": str(gate), "max_kl": 1e9}}
    llm = LLM(model=str(d), max_model_len=n + 64, seed=0, enforce_eager=True,
              kv_cache_memory_bytes=seqkv_budget_for_blocks(d, args.blocks, n + 64),
              additional_config={"kv_cache_backend": "seqkv", "seqkv": {"cold_tier": cold}})
    scored = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=args.top,
                            skip_reading_prefix_cache=False, detokenize=False)
    plain = SamplingParams(max_tokens=1, temperature=0, detokenize=False)

    def run(prompt, salt, params=scored):
        t0 = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=prompt, cache_salt=salt)], params,
                           use_tqdm=False)[0]
        return out, time.perf_counter() - t0

    opt_in = ApproximateReuseConfig.model_fields["salt_prefix"].default
    rng = random.Random(args.seed)
    run(ids[-n:], "warm-up")
    rows = []
    for w in range(args.windows):
        p = ids[w * n:(w + 1) * n]
        for k in ks:
            # two tenants with P's blocks: one for the timed runs, one for the scored runs
            # (the first approximate run leaves P_k's blocks in vLLM's cache under its salt)
            timed, tenant = f"t{w}-{k}-timed", f"t{w}-{k}"
            run(p, timed, plain)
            run(p, tenant, plain)
            pk = list(p)
            for pos in rng.sample(range(args.context), k):
                other = rng.randrange(vocab - 1)
                pk[pos] = other + (other >= p[pos])
            _, t_exact = run(pk, f"exact-timed-{w}-{k}", plain)
            timed_approx, t_approx = run(pk, opt_in + timed, plain)
            exact, t_exact_scored = run(pk, f"exact-{w}-{k}")
            approx, _ = run(pk, opt_in + tenant)
            row = {"window": w, "substitutions": k, "cached_tokens": approx.num_cached_tokens,
                   "timed_cached_tokens": timed_approx.num_cached_tokens,
                   "exact_ttft_s": t_exact, "approx_ttft_s": t_approx,
                   "exact_ttft_with_prompt_logprobs_s": t_exact_scored,
                   **compare(tail_logprobs(exact, args.tail), tail_logprobs(approx, args.tail),
                             pk[-(args.tail - 1):], args.top)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    llm.llm_engine.engine_core.shutdown()

    def mean(rs, key):
        return sum(r[key] for r in rs) / len(rs)

    per_k = []
    for k in ks:
        rs = [r for r in rows if r["substitutions"] == k]
        per_k.append({"substitutions": k, "windows": len(rs),
                      "served_windows": sum(r["cached_tokens"] == args.context for r in rs),
                      "cached_tokens": mean(rs, "cached_tokens"),
                      "kl_top_nats_per_token": mean(rs, "kl_top"),
                      "kl_top_max_window": max(r["kl_top"] for r in rs),
                      "delta_ppl_pct": 100 * (math.exp(mean(rs, "dnll")) - 1),
                      "top1_agreement": mean(rs, "top1_agreement"),
                      "ttft_speedup": mean(rs, "exact_ttft_s") / mean(rs, "approx_ttft_s")})
    prompt_logprobs_cost = (mean(rows, "exact_ttft_with_prompt_logprobs_s")
                            / mean(rows, "exact_ttft_s"))
    res = {"model": d.name, "context": args.context, "tail": args.tail, "top": args.top,
           "runs": rows, "by_substitutions": per_k,
           "prefill_time_with_prompt_logprobs_over_without": prompt_logprobs_cost,
           "machine": f"{os.cpu_count()} CPUs",
           "date": datetime.date.today().isoformat(),
           "command": "python -m benchmarks.approx_vllm " + " ".join(argv or sys.argv[1:])}
    print(json.dumps(per_k, indent=2))
    data = json.loads(args.out.read_text()) if args.out.exists() else {}
    data["vllm" if args.model == "smollm2" else f"vllm_{args.model}"] = res
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    gate_out = args.gate_out or (Path("benchmarks/approx_served_gate.json")
                                 if args.model == "smollm2" else None)
    if gate_out is not None:
        QualityGate(d.name, {r["substitutions"]: r["kl_top_nats_per_token"] for r in per_k},
                    res["command"]).save(gate_out)
    if args.model == "smollm2":
        replace_section(args.markdown, SECTION, markdown(res, data.get("kl_by_substitutions", {}),
                                                         data.get("codec_kl")))
    return res


def markdown(res: dict, gate: dict, codec_kl: float | None = None) -> str:
    from vllm_seqkv.plt.approximate import QualityGate

    rows = ["| substituted tokens | tokens from the tier | KL nats/token (mean / worst window) | "
            "fp32 gate (transformers, worst kind) | Δppl % of the tail | top-1 agreement | TTFT speed-up |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    ratios = []
    for r in res["by_substitutions"]:
        g = gate.get(str(r["substitutions"]))
        if g:
            ratios.append(r["kl_top_nats_per_token"] / g)
        rows.append(f"| {r['substitutions']} | {r['cached_tokens']:.0f} | "
                    f"{r['kl_top_nats_per_token']:.4f} / {r['kl_top_max_window']:.4f} | "
                    f"{'—' if g is None else format(g, '.4f')} | {r['delta_ppl_pct']:+.2f} | "
                    f"{r['top1_agreement']:.3f} | {r['ttft_speedup']:.1f}x |")
    windows = res["by_substitutions"][0]["windows"] if res["by_substitutions"] else 0
    text = (
        f"Command: `{res['command']}`  \nMachine: {res['machine']}, no GPU. Date: {res['date']}.\n\n"
        f"Model `{res['model']}` served by vLLM (CPU, seqkv-3 pages, CPU cold tier with "
        f"`cold_tier.approximate`), {windows} held-out windows of {res['context']} + "
        f"{res['tail']} tokens. Per window and k: the window runs under a tenant salt T (its "
        f"blocks go to the tier); the window with k uniform random tokens substituted in its "
        f"first {res['context']} runs under a fresh salt (exact) and under `approx:T` (the "
        f"connector serves those {res['context']} tokens from T's blocks, vLLM prefills the "
        f"tail). KL(exact || approximate) of the tail's next-token distributions, estimated "
        f"on the exact run's top {res['top']} tokens plus one category for the rest (vLLM "
        f"returns the top {res['top']} log-probabilities); the fp32 gate column is the "
        f"transformers measurement above (`benchmarks/approx.json`). TTFT speed-up: exact over "
        f"approximate time to first token, same engine, in runs that ask for no "
        f"log-probabilities.\n\n" + "\n".join(rows) + "\n"
    )
    if ratios:
        text += (f"\nServed, the KL is {min(ratios):.1f}-{max(ratios):.1f}x the fp32 gate's "
                 f"(likely cause, not separated here: a substituted token changes the K/V "
                 f"after it, and with them the quantization and bf16 rounding noise the tail "
                 f"sees). The served KL per k is written as a "
                 f"gate of its own, `benchmarks/approx_served_gate.json`")
        if codec_kl:
            served = QualityGate(res["model"], {r["substitutions"]: r["kl_top_nats_per_token"]
                                                for r in res["by_substitutions"]})
            fp32 = QualityGate(res["model"], {int(k): v for k, v in gate.items()})
            text += (f": at the codec's own KL ({codec_kl:.4f}) it allows "
                     f"**{served.max_substitutions(codec_kl)}** substituted token(s), the fp32 "
                     f"gate {fp32.max_substitutions(codec_kl)}")
        text += ".\n"
    cost = res.get("prefill_time_with_prompt_logprobs_over_without")
    if cost:
        text += (f"\nThe PLT's edge labels (per-token log-probabilities) from vLLM: a prefill of "
                 f"{res['context'] + res['tail']} tokens that asks for prompt log-probabilities "
                 f"(top {res['top']}) took **{cost:.2f}x** the time of a plain one (same runs, "
                 f"exact side, mean over all windows and k).\n")
    return text


if __name__ == "__main__":
    main()
