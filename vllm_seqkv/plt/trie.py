"""The probabilistic language trie (PLT): a trie over token-id blocks.

Each node is one KV block of ``block_size`` tokens; its key is the tuple of its token ids
under its parent, so the path from a tenant's root spells a block-aligned prefix. Nodes carry
hit statistics and, when the caller gives them, the model's natural-log probability of each
of their tokens (the edge labels of the paper's PLT), from which
``distance(s, s2) = d_T = -log2 P_M(s ∧ s2)`` is computed.

Edge labels come from the caller: :func:`edge_logprobs` takes them from vLLM's prompt
log-probabilities (``SamplingParams(prompt_logprobs=0)``: what that costs in a prefill is in
BENCHMARKS.md, "Approximate prefix reuse through vLLM"), or any causal LM's log-softmax.

Tenants are isolated by a cache salt: every salt has its own root and the salt is folded into
every block hash, so one tenant's lookups can never reach another tenant's nodes.

No vLLM or CUDA import: this module is plain Python.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

LN2 = math.log(2.0)


def block_hash(parent: bytes, tokens: Sequence[int], salt: str) -> bytes:
    """Chained 16-byte hash of a block: (parent hash, salt, token ids)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent)
    h.update(salt.encode())
    h.update(b"\x00")
    h.update(np.asarray(tokens, dtype="<i8").tobytes())
    return h.digest()


def edge_logprobs(token_ids: Sequence[int], prompt_logprobs: Sequence, first: float = 0.0) -> np.ndarray:
    """ln P_M(token i | tokens before it) per prompt token, from vLLM's
    ``RequestOutput.prompt_logprobs`` (one dict ``token id -> Logprob`` per position, None at
    position 0, which no context predicts: ``first`` stands for it)."""
    if len(prompt_logprobs) != len(token_ids):
        raise ValueError(f"{len(prompt_logprobs)} prompt log-probabilities for {len(token_ids)} tokens")
    out = np.empty(len(token_ids), np.float64)
    for i, (t, lp) in enumerate(zip(token_ids, prompt_logprobs)):
        if lp is None:
            if i:
                raise ValueError(f"no log-probability at position {i}")
            out[i] = first
            continue
        entry = lp[int(t)]
        out[i] = getattr(entry, "logprob", entry)
    return out


@dataclass(eq=False)
class Node:
    tokens: tuple[int, ...]
    hash: bytes
    salt: str
    parent: "Node | None"
    depth: int  # blocks from the root (root = 0, first block = 1)
    logprobs: np.ndarray | None = None  # natural-log P_M(token | prefix), one per token
    hits: int = 0
    inserts: int = 0
    created: float = 0.0
    last_access: float = 0.0
    tier: str = "hot"
    children: dict[tuple[int, ...], "Node"] = field(default_factory=dict)

    @property
    def is_leaf(self) -> bool:
        return not self.children

    @property
    def logprob(self) -> float | None:
        """Natural-log probability of the whole block, or None if not given."""
        return None if self.logprobs is None else float(self.logprobs.sum())

    @property
    def info_bits(self) -> float | None:
        lp = self.logprob
        return None if lp is None else -lp / LN2


@dataclass(frozen=True)
class Match:
    nodes: list[Node]
    block_size: int

    @property
    def num_tokens(self) -> int:
        return len(self.nodes) * self.block_size

    @property
    def hashes(self) -> list[bytes]:
        return [n.hash for n in self.nodes]


class PrefixTrie:
    """Block trie with paired verbs: :meth:`insert` / :meth:`match_prefix` / :meth:`evict`.

    ``clock`` is injectable (simulations pass a logical clock).
    """

    def __init__(self, block_size: int = 16, clock=time.monotonic, max_blocks: int | None = None):
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.block_size = block_size
        self.clock = clock
        self.max_blocks = max_blocks
        self._roots: dict[str, Node] = {}
        self._by_hash: dict[bytes, Node] = {}
        self._leaves: dict[bytes, Node] = {}
        self.lookups = 0
        self.lookup_tokens = 0
        self.hit_tokens = 0

    # ---- structure -------------------------------------------------------------------------
    def _root(self, salt: str, create: bool) -> Node | None:
        root = self._roots.get(salt)
        if root is None and create:
            root = Node((), block_hash(b"", (), salt), salt, None, 0)
            self._roots[salt] = root
        return root

    def _blocks(self, tokens: Sequence[int]) -> Iterator[tuple[int, ...]]:
        bs = self.block_size
        for i in range(len(tokens) // bs):
            yield tuple(int(t) for t in tokens[i * bs:(i + 1) * bs])

    def __len__(self) -> int:
        return len(self._by_hash)

    def __contains__(self, h: bytes) -> bool:
        return h in self._by_hash

    def get(self, h: bytes) -> Node | None:
        return self._by_hash.get(h)

    def nodes(self) -> Iterator[Node]:
        return iter(list(self._by_hash.values()))

    def leaves(self) -> list[Node]:
        return list(self._leaves.values())

    def oldest_leaf(self) -> Node | None:
        """The leaf that became a leaf first (insertion order), or None when empty."""
        return next(iter(self._leaves.values()), None)

    # ---- verbs -----------------------------------------------------------------------------
    def match_prefix(self, tokens: Sequence[int], salt: str = "", touch: bool = True) -> Match:
        """Longest cached block-aligned prefix of ``tokens`` within tenant ``salt``."""
        node = self._root(salt, create=False)
        out: list[Node] = []
        if node is not None:
            for blk in self._blocks(tokens):
                node = node.children.get(blk)
                if node is None:
                    break
                out.append(node)
        if touch:
            now = self.clock()
            self.lookups += 1
            self.lookup_tokens += len(tokens)
            self.hit_tokens += len(out) * self.block_size
            for n in out:
                n.hits += 1
                n.last_access = now
        return Match(out, self.block_size)

    def can_insert(self, tokens: Sequence[int], salt: str = "") -> int:
        """Number of new nodes :meth:`insert` would create (0: already cached)."""
        have = len(self.match_prefix(tokens, salt, touch=False).nodes)
        return len(tokens) // self.block_size - have

    def insert(self, tokens: Sequence[int], salt: str = "",
               logprobs: Sequence[float] | None = None) -> list[Node]:
        """Insert every full block of ``tokens``; returns the path (existing + new nodes).

        ``logprobs[i]`` (optional) is ln P_M(tokens[i] | tokens[:i]); it fills the nodes'
        edge labels (also on existing nodes that lacked them).
        """
        if logprobs is not None and len(logprobs) < len(tokens) // self.block_size * self.block_size:
            raise ValueError("logprobs must cover every token of the inserted blocks")
        lp = None if logprobs is None else np.asarray(logprobs, dtype=np.float64)
        node = self._root(salt, create=True)
        now = self.clock()
        path = []
        bs = self.block_size
        for i, blk in enumerate(self._blocks(tokens)):
            child = node.children.get(blk)
            if child is None:
                if self.max_blocks is not None and len(self._by_hash) >= self.max_blocks:
                    break
                child = Node(blk, block_hash(node.hash, blk, salt), salt, node, node.depth + 1,
                             created=now, last_access=now)
                node.children[blk] = child
                self._by_hash[child.hash] = child
                self._leaves.pop(node.hash, None)
                self._leaves[child.hash] = child
            child.inserts += 1
            child.last_access = max(child.last_access, now)
            if lp is not None and child.logprobs is None:
                child.logprobs = lp[i * bs:(i + 1) * bs].copy()
            path.append(child)
            node = child
        return path

    def evict(self, h: bytes) -> Node:
        """Remove leaf ``h`` (inner nodes hold the prefix their children depend on)."""
        node = self._by_hash.get(h)
        if node is None:
            raise KeyError(h.hex())
        if not node.is_leaf:
            raise ValueError("only leaves can be evicted; evict the children first")
        del node.parent.children[node.tokens]
        del self._by_hash[h]
        self._leaves.pop(h, None)
        if node.parent.parent is not None and not node.parent.children:
            self._leaves[node.parent.hash] = node.parent
        if node.parent.parent is None and not node.parent.children:
            self._roots.pop(node.salt, None)
        return node

    # ---- statistics ------------------------------------------------------------------------
    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0

    def stats(self) -> dict:
        return {"nodes": len(self), "tenants": len(self._roots), "lookups": self.lookups,
                "lookup_tokens": self.lookup_tokens, "hit_tokens": self.hit_tokens,
                "hit_rate": self.hit_rate}

    # ---- d_T -------------------------------------------------------------------------------
    def distance(self, s: Sequence[int], s2: Sequence[int], salt: str = "") -> float:
        """d_T(s, s2) = -log2 P_M(s ∧ s2) in bits, from the stored per-token log-probs.

        The longest common prefix is taken at token granularity; it must be covered by
        cached nodes that carry log-probs (a partial last block uses its first tokens),
        otherwise :class:`LookupError`. Identical empty prefix -> 0 bits.
        """
        lcp = 0
        for a, b in zip(s, s2):
            if a != b:
                break
            lcp += 1
        if lcp == 0:
            return 0.0
        node = self._root(salt, create=False)
        bits = 0.0
        bs = self.block_size
        full, rest = divmod(lcp, bs)
        # a partial last block: find the cached child of the last full node that agrees on
        # the first `rest` tokens with s (any such child carries the same conditionals).
        for i in range(full + (1 if rest else 0)):
            if node is None:
                break
            want = tuple(int(t) for t in s[i * bs:(i + 1) * bs])
            nxt = node.children.get(want) if i < full else None
            if nxt is None and i == full:
                nxt = next((c for k, c in node.children.items()
                            if k[:rest] == want[:rest] and c.logprobs is not None), None)
            node = nxt
            if node is None or node.logprobs is None:
                raise LookupError(f"common prefix block {i} is not cached with log-probs")
            take = bs if i < full else rest
            bits += -float(node.logprobs[:take].sum()) / LN2
        if node is None:
            raise LookupError("common prefix is not cached")
        return bits
