"""Approximate prefix reuse: serve a request from the KV of a cached prefix that differs in a few tokens.

Exact prefix caching needs every token of a block to match. Two prompts that differ in a
date, a name or a typo share nothing after the first difference. Approximate reuse takes the
cached blocks anyway and accepts that the K/V at and after the substituted positions were
computed for the other tokens: the request is then no longer computed exactly.

It is off unless asked for, and bounded by a measured quality gate:

* :func:`near_match` walks one tenant's trie (the salt still isolates tenants) and returns
  the longest block path within ``max_substitutions`` token substitutions of the request
  (greedy: an exact child first, else the child with the fewest differing tokens);
* :class:`QualityGate` holds KL(exact || reused) of the next-token distribution per number of
  substituted tokens, measured on held-out text by ``python -m benchmarks.approx``
  (worst case over the kinds of substitution measured), and turns a KL budget into the
  largest number of substitutions it allows: 0 means exact reuse only;
* :class:`ApproximateIndex` is what the KV connector keeps for it: the exactly computed
  block prefixes it holds, by tenant, each node tied to the key of its stored block
  (``insert`` / ``match`` / ``forget``).

No vLLM or CUDA import: this module is plain Python.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from vllm_seqkv.plt.trie import Node, PrefixTrie


@dataclass(frozen=True)
class NearMatch:
    nodes: list[Node]
    substitutions: list[int]  # token positions where the cached prefix differs from the request
    block_size: int

    @property
    def num_tokens(self) -> int:
        return len(self.nodes) * self.block_size

    @property
    def exact(self) -> bool:
        return not self.substitutions


def _differences(cached: tuple[int, ...], wanted: tuple[int, ...], limit: int) -> list[int]:
    """Positions where the blocks differ, stopping once there are more than ``limit``."""
    out = []
    for i, (a, b) in enumerate(zip(cached, wanted)):
        if a != b:
            out.append(i)
            if len(out) > limit:
                break
    return out


def near_match(trie: PrefixTrie, tokens: Sequence[int], salt: str = "",
               max_substitutions: int = 0) -> NearMatch:
    """Longest cached block path of tenant ``salt`` within ``max_substitutions`` of ``tokens``."""
    if max_substitutions < 0:
        raise ValueError("max_substitutions must be >= 0")
    bs = trie.block_size
    node = trie._root(salt, create=False)
    path: list[Node] = []
    subs: list[int] = []
    if node is None:
        return NearMatch(path, subs, bs)
    for i in range(len(tokens) // bs):
        wanted = tuple(int(t) for t in tokens[i * bs:(i + 1) * bs])
        child = node.children.get(wanted)
        diff: list[int] = []
        if child is None:
            budget = max_substitutions - len(subs)
            best = None
            for key, candidate in node.children.items():
                d = _differences(key, wanted, budget)
                if len(d) <= budget and (best is None or len(d) < len(best[1])):
                    best = (candidate, d)
            if best is None:
                break
            child, diff = best
        path.append(child)
        subs.extend(i * bs + j for j in diff)
        node = child
    return NearMatch(path, subs, bs)


@dataclass(frozen=True)
class QualityGate:
    """Measured KL(exact || approximate reuse), nats per token, per number of substitutions."""

    model: str
    kl_by_substitutions: dict[int, float]
    command: str = ""

    def max_substitutions(self, max_kl: float) -> int:
        """Largest measured k such that every measured k' <= k is within ``max_kl``; 0 = exact
        reuse only. NOTE: nothing beyond the largest measured k is ever allowed."""
        allowed = 0
        for k in sorted(self.kl_by_substitutions):
            if k < 1 or self.kl_by_substitutions[k] > max_kl:
                break
            allowed = k
        return allowed

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps({"model": self.model, "command": self.command,
                                          "kl_by_substitutions": self.kl_by_substitutions},
                                         indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "QualityGate":
        raw = json.loads(Path(path).read_text())
        return cls(raw["model"], {int(k): float(v) for k, v in raw["kl_by_substitutions"].items()},
                   raw.get("command", ""))


class ApproximateIndex:
    """Block prefixes a cold tier holds, by tenant, for approximate reuse.

    ``insert`` records a finished request's blocks (tokens, tenant salt) with the tier keys
    they were stored under, dropping the oldest leaves beyond ``max_blocks``; ``match``
    returns the keys of the longest near match of a request's tokens, cut at the first block
    whose key ``held`` denies; ``forget`` drops a key the tier no longer holds (and every
    leaf left without one).
    NOTE: only exactly computed blocks may be inserted: a near match of a near match would
    add substitutions the gate never measured.
    """

    def __init__(self, block_size: int, max_blocks: int | None = None):
        self.trie = PrefixTrie(block_size)
        self.max_blocks = max_blocks
        self._key_of: dict[bytes, bytes] = {}  # node hash -> tier key
        self._node_of: dict[bytes, bytes] = {}  # tier key -> node hash

    def __len__(self) -> int:
        return len(self._key_of)

    def insert(self, tokens: Sequence[int], salt: str, keys: Sequence[bytes]) -> None:
        bs = self.trie.block_size
        tokens = tokens[:len(keys) * bs]
        while self.max_blocks is not None and \
                len(self.trie) + self.trie.can_insert(tokens, salt) > self.max_blocks:
            oldest = self.trie.oldest_leaf()
            if oldest is None:
                break
            self._drop(oldest)
        for node, key in zip(self.trie.insert(tokens, salt), keys):
            old = self._key_of.get(node.hash)
            if old is not None and old != key:
                self._node_of.pop(old, None)
            self._key_of[node.hash] = key
            self._node_of[key] = node.hash

    def match(self, tokens: Sequence[int], salt: str, max_substitutions: int,
              held: Callable[[bytes], bool]) -> tuple[NearMatch, list[bytes]]:
        found = near_match(self.trie, tokens, salt, max_substitutions)
        keys: list[bytes] = []
        for node in found.nodes:
            key = self._key_of.get(node.hash)
            if key is None or not held(key):
                break
            keys.append(key)
        bs = self.trie.block_size
        subs = [p for p in found.substitutions if p < len(keys) * bs]
        return NearMatch(found.nodes[:len(keys)], subs, bs), keys

    def _drop(self, leaf: Node) -> None:
        key = self._key_of.pop(leaf.hash, None)
        if key is not None:
            self._node_of.pop(key, None)
        self.trie.evict(leaf.hash)

    def forget(self, key: bytes) -> None:
        h = self._node_of.pop(key, None)
        if h is None:
            return
        del self._key_of[h]
        node = self.trie.get(h)
        while (node is not None and node.parent is not None and node.is_leaf
               and node.hash not in self._key_of):
            parent = node.parent
            self.trie.evict(node.hash)
            node = parent if parent.parent is not None else None
