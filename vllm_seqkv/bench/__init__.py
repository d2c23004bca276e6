"""The ruler: perplexity / KL / attention error of KV codecs, and the paper's entropy claims.

Run ``python -m vllm_seqkv.bench quality`` or ``python -m vllm_seqkv.bench entropy``.
Nothing here imports vLLM.
"""
