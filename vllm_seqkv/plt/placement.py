"""Which block a cold tier evicts: the learned PLT policy over the key chains of requests.

A tier only sees opaque keys. The connector tells it, once per finished request, the chain
of that request's block keys from its first block (:meth:`LearnedEviction.access`): that is
the prefix structure (parent = the block before), the depth, and the reuse history the
:class:`~vllm_seqkv.plt.policy.PLTPolicy` learns from. The clock counts requests.

:class:`KeyTrie` is that structure: a trie whose nodes are keys (no tokens, no salt: the
keys already fold in the tenant), with the verbs the policy needs (``leaves``, ``evict``).
It holds every key of the chains it saw, held by the tier or not, until the key is a leaf
that the tier no longer holds.

NOTE: victims are leaves of the trie (a block is loaded only after its whole prefix, so a
held child of an evicted block is dead weight). Keys the tier holds but no chain named (left
on disk by a previous engine, or saved before their request's chain arrived) go first, in
the order the tier adopted them.

Cost: a victim is the lowest-scored of ``sample`` leaves drawn at random (all leaves when
there are fewer), as Redis samples for its LRU, so an eviction costs O(sample) whatever the
tier holds (scoring every leaf grows with the tier, under the lock the engine thread also
takes); on the replayed trace both choose alike (:mod:`.replay`, ``--sample``).
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Collection, Sequence

from vllm_seqkv.plt.policy import CostModel, PLTPolicy
from vllm_seqkv.plt.trie import Node


class KeyTrie:
    """Trie of block keys: ``record(chain)`` / ``evict(key)`` / ``leaves()``."""

    def __init__(self, block_size: int, clock):
        self.block_size = block_size
        self.clock = clock
        self.root = Node((), b"", "", None, 0)
        self._by_key: dict[bytes, Node] = {}
        self._leaves: list[Node] = []
        self._leaf_at: dict[bytes, int] = {}  # NOTE: _leaves[_leaf_at[k]].hash == k

    def __len__(self) -> int:
        return len(self._by_key)

    def __contains__(self, key: bytes) -> bool:
        return key in self._by_key

    def get(self, key: bytes) -> Node | None:
        return self._by_key.get(key)

    def leaves(self) -> list[Node]:
        return list(self._leaves)

    def sample_leaves(self, count: int, rng: random.Random) -> list[Node]:
        """``count`` distinct leaves drawn uniformly (all of them when there are fewer)."""
        if count >= len(self._leaves):
            return list(self._leaves)
        return rng.sample(self._leaves, count)

    def _add_leaf(self, node: Node) -> None:
        if node.hash not in self._leaf_at:
            self._leaf_at[node.hash] = len(self._leaves)
            self._leaves.append(node)

    def _remove_leaf(self, key: bytes) -> None:
        at = self._leaf_at.pop(key, None)
        if at is None:
            return
        last = self._leaves.pop()
        if at < len(self._leaves):
            self._leaves[at] = last
            self._leaf_at[last.hash] = at

    def record(self, chain: Sequence[bytes]) -> list[Node]:
        """The nodes of ``chain`` (keys from a request's first block), created as needed."""
        now = self.clock()
        node, path = self.root, []
        for key in chain:
            child = node.children.get(key)
            if child is None:
                child = self._by_key.get(key)
                if child is not None:  # the same key under another parent: keep the first
                    break
                child = Node((), key, "", node, node.depth + 1, created=now, last_access=now)
                node.children[key] = child
                self._by_key[key] = child
                self._remove_leaf(node.hash)
                self._add_leaf(child)
            child.last_access = now
            path.append(child)
            node = child
        return path

    def evict(self, key: bytes) -> Node:
        node = self._by_key[key]
        if not node.is_leaf:
            raise ValueError("only leaves can be evicted; evict the children first")
        parent = node.parent
        del parent.children[key]
        del self._by_key[key]
        self._remove_leaf(key)
        if parent is not self.root and not parent.children:
            self._add_leaf(parent)
        return node


class LearnedEviction:
    """A tier's eviction order from :class:`PLTPolicy` (installed with ``tier.held.set_placement``)."""

    name = "plt"

    def __init__(self, block_size: int, cost: CostModel | None = None, sample: int = 64,
                 seed: int = 0):
        self.sample = sample
        self.rng = random.Random(seed)
        self.now = 0
        self.trie = KeyTrie(block_size, clock=lambda: self.now)
        self.policy = PLTPolicy(cost)
        self.pinned: set[bytes] = set()
        self.untracked: OrderedDict[bytes, None] = OrderedDict()  # held, in no chain yet

    def adopt(self, key: bytes) -> None:
        """The tier now holds ``key``."""
        if key not in self.trie:
            self.untracked[key] = None

    def access(self, chain: Sequence[bytes]) -> None:
        """A request used the blocks ``chain`` (its keys from the first block): one clock tick."""
        self.now += 1
        path = self.trie.record(chain)
        for node in path:
            self.untracked.pop(node.hash, None)
            self.policy.touch(node, self.trie)
        self.pinned = {n.hash for n in path}

    def victim(self, held: Collection[bytes], exclude: bytes | None = None) -> bytes | None:
        """The key to evict among ``held`` (the tier's keys)."""
        for key in self.untracked:
            if key != exclude and key in held:
                return key
        self.policy.refresh_rates(self.now)
        pinned = self.pinned | {exclude}
        for _ in range(4):
            best = None
            for node in self.trie.sample_leaves(self.sample, self.rng):
                if node.hash in pinned:
                    continue
                if node.hash not in held:  # structure only (its save failed): prune
                    self._drop(node.hash)
                    continue
                score = self.policy.score(node, self.trie, self.now)
                if best is None or score < best[0]:
                    best = (score, node.hash)
            if best is not None:
                return best[1]
        return next((k for k in held if k != exclude), None)  # only pinned blocks are left

    def forget(self, key: bytes) -> None:
        """The tier no longer holds ``key``."""
        self.untracked.pop(key, None)
        node = self.trie.get(key)
        if node is not None and node.is_leaf:
            self._drop(key)

    def _drop(self, key: bytes) -> None:
        node = self.trie.evict(key)
        if node.hash in self.policy.uses:
            self.policy.on_evict(node)
