"""Probabilistic language trie (PLT) over cached prefixes, the learned placement policy that
chooses what a cold tier evicts, and the approximate-prefix index.

Plain Python + numpy: no vLLM or CUDA import. The cold tiers themselves (coders, framing,
storage) live in :mod:`vllm_seqkv.tiers`.
"""

from vllm_seqkv.plt.trie import Match, Node, PrefixTrie, block_hash

__all__ = ["Match", "Node", "PrefixTrie", "block_hash"]
