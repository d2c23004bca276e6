"""`python -m benchmarks.approx`: what approximate prefix reuse costs in quality (the gate).

SmolLM2 (transformers, fp32, CPU) on held-out text. For each window of ``--context``
tokens s: the exact next-token distributions of its last ``--tail`` positions; then, for k
substituted tokens at random positions of the first ``context - tail`` tokens, the cached
prefix s' (s with those tokens replaced), its K/V computed by the model, and the last
``--tail`` tokens of s run on top of it (what approximate reuse of s' for s serves). Two
kinds of substitution: ``plausible`` (the model's most likely other token at that position:
a near-paraphrase) and ``random`` (a uniform vocabulary token). Reported per (k, kind):
KL(exact || reused) in nats per token and the change of the true tokens' NLL (%, i.e.
Δppl), with the ruler's KL of the default codec (seqkv-3) beside it as the scale.

Writes ``benchmarks/approx.json`` (the :class:`~vllm_seqkv.plt.approximate.QualityGate`:
worst KL over kinds per k) and the section "Approximate prefix reuse" of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

import seqkv_fixtures as fixtures
from benchmarks.report import replace_section, run_header, write_json
from vllm_seqkv.plt.approximate import QualityGate

SECTION = "## Approximate prefix reuse"
KINDS = ("plausible", "random")


def tail_logprobs(model, prefix: list[int], tail: list[int]) -> torch.Tensor:
    """log-softmax ``[len(tail), vocab]`` of the tail's positions, on top of ``prefix``'s K/V."""
    with torch.inference_mode():
        cache = model(input_ids=torch.tensor([prefix]), use_cache=True).past_key_values
        out = model(input_ids=torch.tensor([tail]), past_key_values=cache, use_cache=True)
    return torch.log_softmax(out.logits[0].double(), -1)


def substitute(ids: list[int], positions: np.ndarray, kind: str, full_logprobs: torch.Tensor,
               rng: np.random.Generator, vocab: int) -> list[int]:
    out = list(ids)
    for p in positions:
        if kind == "plausible":  # the model's best guess at p other than the true token
            scores = full_logprobs[p - 1].clone()
            scores[ids[p]] = -math.inf
            out[p] = int(scores.argmax())
        else:
            t = int(rng.integers(vocab - 1))
            out[p] = t + (t >= ids[p])
    return out


def measure(model, windows: list[list[int]], tail: int, ks: list[int], seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    vocab = model.config.vocab_size
    rows = {(k, kind): {"kl": [], "nll_exact": [], "nll_reused": []} for k in ks for kind in KINDS}
    for ids in windows:
        cut = len(ids) - tail
        with torch.inference_mode():
            full = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        exact = full[cut:]
        targets = torch.tensor(ids[cut + 1:])
        nll_exact = -exact[:-1].gather(1, targets[:, None]).mean().item()
        for k in ks:
            positions = rng.choice(np.arange(1, cut), size=k, replace=False)
            for kind in KINDS:
                reused = tail_logprobs(model, substitute(ids, positions, kind, full, rng, vocab)[:cut],
                                       ids[cut:])
                kl = (exact.exp() * (exact - reused)).sum(-1).mean().item()
                r = rows[(k, kind)]
                r["kl"].append(kl)
                r["nll_exact"].append(nll_exact)
                r["nll_reused"].append(-reused[:-1].gather(1, targets[:, None]).mean().item())
    out = []
    for (k, kind), r in rows.items():
        e, a = float(np.mean(r["nll_exact"])), float(np.mean(r["nll_reused"]))
        out.append({"substitutions": k, "kind": kind, "kl_nats_per_token": float(np.mean(r["kl"])),
                    "kl_max_window": float(np.max(r["kl"])),
                    "delta_ppl_pct": (math.exp(a - e) - 1) * 100})
    return out


def codec_kl(path: Path = Path("benchmarks/quality.json"), codec: str = "seqkv-3") -> float | None:
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    records = data if isinstance(data, list) else data.get("records", [])
    return next((r["kl"] for r in records if r.get("codec") == codec), None)


def markdown(rec: dict) -> str:
    rows = ["| substituted tokens | kind | KL nats/token (mean / worst window) | Δppl % of the tail |",
            "| ---: | --- | ---: | ---: |"]
    for r in rec["results"]:
        rows.append(f"| {r['substitutions']} | {r['kind']} | {r['kl_nats_per_token']:.4f} / "
                    f"{r['kl_max_window']:.4f} | {r['delta_ppl_pct']:+.2f} |")
    scale = rec["codec_kl"]
    gate = rec["gate"]
    return (
        f"Command: `{rec['command']}`  \nMachine: {rec['machine']}. Date: {rec['date']}.\n\n"
        f"Model `{rec['model']}` (transformers, fp32), held-out text, {rec['windows']} windows of "
        f"{rec['context']} tokens. Each window's last {rec['tail']} tokens run on top of the K/V "
        f"of its first {rec['context'] - rec['tail']} tokens with k of them substituted at random "
        f"positions (plausible: the model's best other token there; random: any token), as "
        f"approximate reuse of a cached near-duplicate prefix would serve them; KL(exact || "
        f"reused) over the tail. Scale: the default codec seqkv-3 costs KL "
        f"{scale if scale is None else format(scale, '.4f')} nats/token in the ruler.\n\n"
        + "\n".join(rows) + "\n\n"
        f"Gate (`vllm_seqkv.plt.approximate.QualityGate`, worst kind per k, from "
        f"`benchmarks/approx.json`): at a KL budget equal to the codec's own "
        f"({gate['budget']}), it allows **{gate['allowed_substitutions']}** substituted "
        f"token(s). The cold tier serves approximate reuse only to requests that opt in "
        f"(`cold_tier.approximate`, a cache salt `approx:` + tenant) within the number of "
        f"substitutions this gate allows at the configured `max_kl`; the same measurement as "
        f"served by vLLM is in the section \"Approximate prefix reuse through vLLM\".\n"
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.approx",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--tail", type=int, default=128)
    parser.add_argument("--ks", default="1,2,4,8,16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/approx.json"))
    parser.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"))
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    d = fixtures.smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(d)(fixtures.corpus_path("test").read_text()[:400_000])["input_ids"]
    windows = [ids[i * args.context:(i + 1) * args.context] for i in range(args.windows)]
    ks = [int(k) for k in args.ks.split(",")]
    results = measure(model, windows, args.tail, ks, args.seed)
    worst = {k: max(r["kl_nats_per_token"] for r in results if r["substitutions"] == k) for k in ks}
    header = run_header("benchmarks.approx", argv)
    gate = QualityGate(d.name, worst, header["command"])
    scale = codec_kl()
    budget = scale if scale is not None else 0.01
    rec = {**header, "model": d.name, "windows": args.windows,
           "context": args.context, "tail": args.tail, "codec_kl": scale, "results": results,
           "kl_by_substitutions": worst,
           "gate": {"budget": round(budget, 4),
                    "allowed_substitutions": gate.max_substitutions(budget)}}
    write_json(args.json, rec)
    replace_section(args.markdown, SECTION, markdown(rec))
    print(json.dumps(rec["gate"]))
    return rec


if __name__ == "__main__":
    main()
