"""Benchmarks of vllm-seqkv (not shipped with the package): the ruler (quality, entropy), load,
isolation, approximate reuse, capacity through vLLM, the prefix trie and cold tiers, restore
through vLLM, CPU and GPU kernels. Run from the repo root: ``python -m benchmarks --help``.
Results live next to the code (``benchmarks/*.json``) and in BENCHMARKS.md.
"""
