"""Probabilistic language trie (PLT) over cached prefixes, what a cold tier holds and which
block it evicts (:mod:`.holdings`: LRU bookkeeping; :mod:`.placement`: the learned policy), and
the approximate-prefix index.

Plain Python + numpy: no vLLM or CUDA import. The cold tiers themselves (storage, coders,
framing, counters) live in :mod:`vllm_seqkv.tiers`.
"""

from vllm_seqkv.plt.trie import Match, Node, PrefixTrie, block_hash

__all__ = ["Match", "Node", "PrefixTrie", "block_hash"]
