"""`python -m benchmarks.replay`: the connector's cold-tier eviction, replayed on traces.

Replays a multi-session trace (:mod:`.traces`) through the same calls the KV connector makes
(:mod:`vllm_seqkv.integration.connector`), on a real :class:`~.tiers.MemoryTier`:

* vLLM's own prefix cache (hot) is modelled as its free-block queue: least recently used
  first, a finished request's blocks queued deepest first (vLLM frees them in reverse);
* a request takes its hot hit, then the cold tier's blocks after it (stopping at the first
  miss, never its last token's block), then finishes: ``eviction="plt"`` hands the tier its
  key chain (:class:`~.placement.LearnedEviction`), and every block the tier lacks is saved
  deepest first; with ``"lru"`` restored blocks are touched root last, as the connector does.

Reports the hit rate (hot + cold tokens over prompt tokens) per cold capacity with both
evictions, at equal bytes, into ``benchmarks/plt.json`` (``connector_eviction``; other keys
kept).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from vllm_seqkv.plt.placement import LearnedEviction
from vllm_seqkv.plt.policy import CostModel, LRUPolicy, OraclePolicy, PLTPolicy, simulate
from vllm_seqkv.tiers import MemoryTier
from benchmarks.traces import TraceConfig, generate
from vllm_seqkv.plt.trie import block_hash

BLOCK_BYTES = 64


@dataclass
class ReplayResult:
    eviction: str
    hot_blocks: int
    cold_blocks: int
    prompt_tokens: int = 0
    hot_tokens: int = 0
    cold_tokens: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        return (self.hot_tokens + self.cold_tokens) / self.prompt_tokens if self.prompt_tokens else 0.0


def key_chain(salt: str, tokens, block_size: int) -> list[bytes]:
    h, out = block_hash(b"", (), salt), []
    for j in range(len(tokens) // block_size):
        h = block_hash(h, tokens[j * block_size:(j + 1) * block_size], salt)
        out.append(h)
    return out


def replay(trace, hot_blocks: int, cold_blocks: int, eviction: str, block_size: int = 16,
           cost: CostModel | None = None, sample: int = 64) -> ReplayResult:
    """Hit rate of ``trace`` [(salt, tokens)] with a hot LRU cache and a cold tier."""
    payload = bytes(BLOCK_BYTES)
    tier = MemoryTier()
    tier.capacity_bytes = cold_blocks * len(tier.coding.encode(b"k" * 16, payload))  # framed blobs
    if eviction == "plt":
        tier.held.set_placement(LearnedEviction(block_size, cost, sample))
    elif eviction != "lru":
        raise ValueError(f"eviction {eviction!r}: choose plt or lru")
    hot: OrderedDict[bytes, None] = OrderedDict()
    res = ReplayResult(eviction, hot_blocks, cold_blocks)
    for salt, tokens in trace:
        chain = key_chain(salt, tokens, block_size)
        limit = min((len(tokens) - 1) // block_size, len(chain))
        n_hot = next((i for i, k in enumerate(chain[:limit]) if k not in hot), limit)
        n_cold = 0
        for k in chain[n_hot:limit]:
            if tier.load(k) is None:
                break
            n_cold += 1
        if eviction == "lru":
            for k in reversed(chain[n_hot:n_hot + n_cold]):
                tier.touch(k)
        res.prompt_tokens += len(tokens)
        res.hot_tokens += n_hot * block_size
        res.cold_tokens += n_cold * block_size
        if tier.held.placement is not None:
            tier.held.placement.access(chain)
        for k in reversed(chain):
            if k not in tier:
                tier.save(k, payload)
        for k in reversed(chain):
            hot[k] = None
            hot.move_to_end(k)
        while len(hot) > hot_blocks:
            hot.popitem(last=False)
    res.evictions = tier.stats.evictions
    return res


def single_cache(trace, capacities=(500, 1000, 2000, 4000)) -> list[dict]:
    """Hit rate of one cache alone under LRU, the learned policy and the oracle (Belady)."""
    return [{"capacity_blocks": cap, "hit_rate_lru": simulate(trace, cap, LRUPolicy()).hit_rate,
             "hit_rate_plt": simulate(trace, cap, PLTPolicy()).hit_rate,
             "hit_rate_oracle": simulate(trace, cap, OraclePolicy(trace)).hit_rate}
            for cap in capacities]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--hot-blocks", type=int, nargs="+", default=[125, 250, 500])
    ap.add_argument("--cold-blocks", type=int, nargs="+", default=[250, 500, 1000, 2000, 4000])
    ap.add_argument("--sample", type=int, default=64, help="leaves scored per eviction (plt)")
    ap.add_argument("--seed", type=int, default=0,
                    help="trace seed (recorded figures: 0; the policy was tuned on 0-2, so 10+ are held out)")
    ap.add_argument("--sim", action="store_true",
                    help="also simulate one cache alone (LRU, PLT and the oracle) on the same trace")
    ap.add_argument("--out", default="benchmarks/plt.json")
    args = ap.parse_args(argv)
    trace = generate(TraceConfig(requests=args.requests, seed=args.seed))
    rows = []
    for hot in args.hot_blocks:
        hot_only = replay(trace, hot, 0, "lru").hit_rate
        for cold in args.cold_blocks:
            lru = replay(trace, hot, cold, "lru")
            plt = replay(trace, hot, cold, "plt", sample=args.sample)
            rows.append({"hot_blocks": hot, "cold_blocks": cold, "hit_rate_hot_only": hot_only,
                         "hit_rate_lru": lru.hit_rate, "hit_rate_plt": plt.hit_rate,
                         "cold_hit_rate_lru": lru.cold_tokens / lru.prompt_tokens,
                         "cold_hit_rate_plt": plt.cold_tokens / plt.prompt_tokens})
            print(json.dumps(rows[-1]))
    record = {"requests": len(trace), "seed": args.seed, "sample": args.sample,
              "hit_rate_infinite": replay(trace, 1, 10**9, "lru").hit_rate,
              "results": rows, "date": datetime.date.today().isoformat(),
              "command": "python -m benchmarks.replay " + " ".join(argv or sys.argv[1:])}
    if args.sim:
        record["single_cache"] = single_cache(trace)
        print(json.dumps(record["single_cache"]))
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    data["connector_eviction"] = record
    out.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
