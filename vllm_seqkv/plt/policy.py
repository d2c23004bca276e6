"""Placement/eviction from a cost model, and an LRU baseline, replayed on request traces.

Value of holding a block = P(reuse) x (cost to rebuild it without this copy - cost to restore
it from here) / bytes held. Rebuild cost = prefill FLOPs of its tokens at its depth
(linear + attention over the prefix) at a measured FLOP rate; restore cost from a tier =
bytes / bandwidth + decode time per byte (both measured by the bench on this machine).

P(reuse) is estimated from the trie's hit statistics in the GreedyDual-Size-Frequency form:
``priority = L + (hits + 1) x value_per_reuse / bytes`` with the inflation ``L`` set to the
priority of the last victim, so that a block not touched for a long time ages out. Only
leaves are evicted (a child is useless without its prefix); the blocks of the request being
served are pinned.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from vllm_seqkv.plt.trie import Node, PrefixTrie


@dataclass
class CostModel:
    params: float = 135e6          # model parameters (FLOPs ~ 2 x params per token)
    layers: int = 30
    hidden: int = 576
    flops_per_s: float = 2e11      # measured prefill rate (bench) or a default
    block_bytes: float = 30 * 16 * 3 * 2 * 64 * 2.0  # bytes held per block in this tier
    bandwidth: float = 10e9        # bytes/s of this tier
    decode_s_per_byte: float = 0.0

    def recompute_s(self, tokens: int, context: int) -> float:
        flops = tokens * (2 * self.params + 4 * self.layers * self.hidden * (context + tokens / 2))
        return flops / self.flops_per_s

    def restore_s(self, nbytes: float) -> float:
        return nbytes / self.bandwidth + nbytes * self.decode_s_per_byte

    def value_per_reuse(self, node: Node, block_size: int) -> float:
        """Seconds saved per reuse per byte held."""
        ctx = (node.depth - 1) * block_size
        saved = self.recompute_s(block_size, ctx) - self.restore_s(self.block_bytes)
        return max(saved, 0.0) / self.block_bytes


class Policy:
    name = "base"

    def __init__(self):
        self.heap: list = []
        self.count = itertools.count()

    def priority(self, node: Node, trie: PrefixTrie) -> float:
        raise NotImplementedError

    def touch(self, node: Node, trie: PrefixTrie) -> None:
        node.prio = self.priority(node, trie)
        heapq.heappush(self.heap, (node.prio, next(self.count), node))

    def on_evict(self, node: Node) -> None:
        pass

    def pop_victim(self, trie: PrefixTrie, pinned: set) -> Node | None:
        skipped = []
        victim = None
        while self.heap:
            prio, c, node = heapq.heappop(self.heap)
            if node.hash not in trie or getattr(node, "prio", None) != prio:
                continue  # stale entry
            if not node.is_leaf or node.hash in pinned:
                skipped.append((prio, c, node))
                continue
            victim = node
            break
        for e in skipped:
            heapq.heappush(self.heap, e)
        return victim


class LRUPolicy(Policy):
    name = "lru"

    def priority(self, node, trie):
        return node.last_access


class PLTPolicy(Policy):
    """Cost model over the trie's hit statistics.

    Reuse probability per unit time is estimated as ``(hits + a) / (age + b)`` (age in the
    clock's units since the block was cached): a block that has been reused keeps a high
    rate (also across an eviction: evicted blocks leave a ghost
    entry with their statistics), a block never reused since insertion starts low (``a`` < 1, a probation like 2Q's)
    and every block decays with age. Victim = leaf with the lowest
    ``rate x seconds saved per reuse per byte``.
    """

    name = "plt"

    def __init__(self, cost: CostModel | None = None, a: float = 0.25, b: float = 1.0,
                 max_ghosts: int = 100_000):
        super().__init__()
        self.cost = cost or CostModel()
        self.a, self.b = a, b
        self.ghosts: dict[bytes, tuple[int, float]] = {}
        self.max_ghosts = max_ghosts

    def score(self, node, trie, now):
        rate = (node.hits + self.a) / (now - node.created + self.b)
        return rate * self.cost.value_per_reuse(node, trie.block_size)

    def touch(self, node, trie):
        ghost = self.ghosts.pop(node.hash, None)
        if ghost is not None and node.inserts == 1:  # re-cached: a miss on a known prefix
            node.hits += ghost[0] + 1
            node.created = ghost[1]

    def on_evict(self, node):
        # the trie remembers evicted prefixes' statistics (ghosts, as in ARC/2Q)
        self.ghosts[node.hash] = (node.hits, node.created)
        if len(self.ghosts) > self.max_ghosts:
            self.ghosts.pop(next(iter(self.ghosts)))

    def pop_victim(self, trie, pinned):
        now = trie.clock()
        cands = [n for n in trie.leaves() if n.hash not in pinned]
        if not cands:
            return None
        return min(cands, key=lambda n: self.score(n, trie, now))


@dataclass
class SimResult:
    policy: str
    capacity_blocks: int
    lookup_tokens: int = 0
    hit_tokens: int = 0
    saved_prefill_s: float = 0.0
    evictions: int = 0
    peak_blocks: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0


def simulate(trace, capacity_blocks: int, policy: Policy, block_size: int = 16,
             cost: CostModel | None = None) -> SimResult:
    """Replay ``trace`` [(salt, tokens)] through a trie of at most ``capacity_blocks``."""
    cost = cost or CostModel()
    clock = itertools.count()
    now = [0]
    trie = PrefixTrie(block_size, clock=lambda: now[0])
    res = SimResult(policy.name, capacity_blocks)
    for salt, tokens in trace:
        now[0] = next(clock)
        m = trie.match_prefix(tokens, salt)
        res.lookup_tokens += len(tokens)
        res.hit_tokens += m.num_tokens
        for n in m.nodes:
            res.saved_prefill_s += cost.recompute_s(block_size, (n.depth - 1) * block_size)
        path = trie.insert(tokens, salt)
        pinned = {n.hash for n in path}
        for n in path:
            policy.touch(n, trie)
        while len(trie) > capacity_blocks:
            v = policy.pop_victim(trie, pinned)
            if v is None:
                break
            trie.evict(v.hash)
            policy.on_evict(v)
            res.evictions += 1
        res.peak_blocks = max(res.peak_blocks, len(trie))
    return res
