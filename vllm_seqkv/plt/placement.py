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
the tier's least-recently-used order.
"""

from __future__ import annotations

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
        self._leaves: dict[bytes, Node] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def __contains__(self, key: bytes) -> bool:
        return key in self._by_key

    def get(self, key: bytes) -> Node | None:
        return self._by_key.get(key)

    def leaves(self) -> list[Node]:
        return list(self._leaves.values())

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
                self._leaves.pop(node.hash, None)
                self._leaves[key] = child
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
        self._leaves.pop(key, None)
        if parent is not self.root and not parent.children:
            self._leaves[parent.hash] = parent
        return node


class LearnedEviction:
    """A tier's eviction order from :class:`PLTPolicy` (set as ``tier.placement``)."""

    name = "plt"

    def __init__(self, block_size: int, cost: CostModel | None = None):
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
        pinned = self.pinned | {exclude}
        while True:
            node = self.policy.pop_victim(self.trie, pinned)
            if node is None:
                return next((k for k in held if k != exclude), None)
            if node.hash in held:
                return node.hash
            self._drop(node.hash)  # a leaf the tier does not hold: structure only

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
