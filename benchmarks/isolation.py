"""Tenant isolation by timing: can one tenant tell, from latency, which prefixes another cached?

`python -m benchmarks.isolation [--prompts 48] [--tokens 1024]`

One real `vllm serve --kv-cache-backend seqkv` (tiny test model, a KV budget that holds
every prompt, so nothing is evicted; the cold tier's keys carry the salt the same way, see
tests/e2e/test_connector.py). ``--prompts`` secret prompts of
``--tokens`` random token ids are sent once by the victim (``cache_salt`` "victim"). Then:

* attack: the attacker (salt "attacker") sends the victim's secret prompts and as many fresh
  prompts of the same length, interleaved in a random order, one at a time, ``max_tokens=1``;
* control: the victim itself does the same with its own secrets and other fresh prompts, to
  show that the probe does see a prefix hit when there is one (same tenant).

For each phase: median request latency (≈ time to first token) on secret vs fresh prompts,
their ratio, a two-sided permutation test of the difference of medians, and the tokens the
server reported as cached (``usage.prompt_tokens_details.cached_tokens``) and its prefix-cache
hit counter. Isolation holds when the attack sees no cached token, no hit, and no latency
difference beyond noise, while the control sees all three. Writes
``benchmarks/isolation.json`` and the section "Tenant isolation (timing)" of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

import seqkv_fixtures as fixtures
from benchmarks.load import MODEL_NAME, scrape_metrics, server_args
from benchmarks.report import replace_section, run_header, write_json
from benchmarks.server import VllmServer

SECTION = "## Tenant isolation (timing)"
HITS = "vllm:prefix_cache_hits_total"


def request(client: httpx.Client, ids: list[int], salt: str) -> tuple[float, int]:
    body = {"model": MODEL_NAME, "prompt": ids, "max_tokens": 1, "temperature": 0,
            "cache_salt": salt}
    t0 = time.perf_counter()
    resp = client.post("/v1/completions", json=body)
    seconds = time.perf_counter() - t0
    resp.raise_for_status()
    details = resp.json()["usage"].get("prompt_tokens_details") or {}
    return seconds, details.get("cached_tokens") or 0


def permutation_p(a: np.ndarray, b: np.ndarray, rounds: int = 20000, seed: int = 0) -> float:
    """Two-sided p-value of |median(a) - median(b)| under random relabelling."""
    rng = np.random.default_rng(seed)
    both = np.concatenate([a, b])
    observed = abs(np.median(a) - np.median(b))
    extreme = 0
    for _ in range(rounds):
        rng.shuffle(both)
        extreme += abs(np.median(both[:len(a)]) - np.median(both[len(a):])) >= observed
    return float((extreme + 1) / (rounds + 1))


def probe(client, base_url: str, secrets, fresh, salt: str, rng) -> dict:
    order = [(True, p) for p in secrets] + [(False, p) for p in fresh]
    rng.shuffle(order)
    hits_before = scrape_metrics(base_url).get(HITS, 0.0)
    times = {True: [], False: []}
    cached = {True: 0, False: 0}
    for is_secret, ids in order:
        seconds, c = request(client, ids, salt)
        times[is_secret].append(seconds)
        cached[is_secret] += c
    hits = scrape_metrics(base_url).get(HITS, 0.0) - hits_before
    s, f = np.array(times[True]), np.array(times[False])
    return {"salt": salt, "median_s_secret": float(np.median(s)), "median_s_fresh": float(np.median(f)),
            "ratio_secret_over_fresh": float(np.median(s) / np.median(f)),
            "p_value": permutation_p(s, f), "cached_tokens_secret": cached[True],
            "cached_tokens_fresh": cached[False], "prefix_cache_hit_tokens": hits,
            "latencies_s_secret": times[True], "latencies_s_fresh": times[False]}


def markdown(r: dict) -> str:
    rows = ["| phase | salt of the prober | median s, victim's prompts | median s, fresh prompts | "
            "ratio | permutation p | cached tokens reported (victim's / fresh) | prefix-cache hit tokens |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in ("attack", "control"):
        p = r[name]
        rows.append(f"| {name} | {p['salt']} | {p['median_s_secret']:.3f} | {p['median_s_fresh']:.3f} | "
                    f"{p['ratio_secret_over_fresh']:.2f} | {p['p_value']:.3g} | "
                    f"{p['cached_tokens_secret']} / {p['cached_tokens_fresh']} | "
                    f"{p['prefix_cache_hit_tokens']:.0f} |")
    return (
        f"Command: `{r['command']}`  \nMachine: {r['machine']}. Date: {r['date']}.\n\n"
        "Real `vllm serve --kv-cache-backend seqkv` (tiny test model, no eviction). The victim "
        f"(`cache_salt` victim) sends {r['prompts']} secret prompts of "
        f"{r['tokens']} random token ids once. Attack: another tenant sends those prompts and "
        f"{r['prompts']} fresh ones of the same length, interleaved at random, one at a time, "
        f"`max_tokens` 1, and times each request. Control: the victim does the same with its own "
        f"prompts (a prefix hit must show). p: two-sided permutation test of the difference of "
        f"medians. Raw latencies: `benchmarks/isolation.json`.\n\n" + "\n".join(rows) + "\n\n"
        f"Verdict: {r['verdict']}\n"
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.isolation",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=64 << 20,
                        help="must hold every prompt (nothing evicted)")
    parser.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "seqkv-isolation.log")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/isolation.json"))
    parser.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"))
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)

    def prompts(n):
        return [rng.integers(10, 4000, args.tokens).tolist() for _ in range(n)]

    secrets, fresh_attack, fresh_control = prompts(args.prompts), prompts(args.prompts), prompts(args.prompts)
    srv_args = server_args("seqkv", kv_bytes=args.kv_cache_memory_bytes,
                           max_model_len=args.tokens + 16, max_num_seqs=4)
    with VllmServer(fixtures.tiny_model_dir(), srv_args, args.log) as srv, \
            httpx.Client(base_url=srv.base_url, timeout=300) as client:
        request(client, prompts(1)[0], "warm-up")
        for ids in secrets:
            request(client, ids, "victim")
        attack = probe(client, srv.base_url, secrets, fresh_attack, "attacker", rng)
        control = probe(client, srv.base_url, secrets, fresh_control, "victim", rng)
    isolated = (attack["cached_tokens_secret"] == 0 and attack["prefix_cache_hit_tokens"] == 0
                and attack["p_value"] > 0.01)
    sensitive = control["cached_tokens_secret"] > 0 and control["p_value"] < 0.01
    verdict = ("isolated: the attacker saw no cached token, no prefix hit and no significant "
               "latency difference" if isolated else "NOT isolated: see the attack row")
    verdict += ("; the control shows the probe detects a same-tenant hit" if sensitive else
                "; the control did not detect same-tenant hits, so this run proves little")
    record = {**run_header("benchmarks.isolation", argv),
              "model": fixtures.tiny_model_dir().name,
              "prompts": args.prompts, "tokens": args.tokens, "attack": attack, "control": control,
              "isolated": isolated, "probe_is_sensitive": sensitive, "verdict": verdict}
    write_json(args.json, record)
    replace_section(args.markdown, SECTION, markdown(record))
    print(verdict)
    return record


if __name__ == "__main__":
    main()
