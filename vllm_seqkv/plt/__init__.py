"""Probabilistic language trie (PLT) over cached prefixes, cold tiers and placement policy.

Plain Python + numpy + constriction: no vLLM or CUDA import (transformers only for the
token tier's model). A KV connector calls the tiers' ``save(block_hash, bytes)`` /
``load(block_hash) -> bytes | None``.
"""

from vllm_seqkv.plt.trie import Match, Node, PrefixTrie, block_hash

__all__ = ["Match", "Node", "PrefixTrie", "block_hash"]
