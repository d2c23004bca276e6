"""Build and tear down in-process vLLM engines for tests."""

from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def engine(model_dir, backend: str = "seqkv", seqkv_options: dict | None = None, **kwargs):
    from vllm import LLM

    options = dict(max_model_len=512, kv_cache_memory_bytes=32 << 20, seed=0, enforce_eager=True)
    options.update(kwargs)
    additional_config = {"kv_cache_backend": backend, "seqkv": seqkv_options or {}}
    llm = LLM(model=str(model_dir), additional_config=additional_config, **options)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def kv_tokens(llm) -> int:
    cache = llm.llm_engine.vllm_config.cache_config
    return cache.num_gpu_blocks * cache.block_size


def prompt_logprobs(llm, *prompts: list[int]) -> list[list[float]]:
    """Log-probability of every prompt token after the first, one list per prompt (batched)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [[lp[t].logprob for t, lp in zip(o.prompt_token_ids[1:], o.prompt_logprobs[1:])]
            for o in outs]


def greedy(llm, prompts, max_tokens: int = 16) -> list[list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def seqkv_fixed_memory(model_dir, seqkv_options: dict | None = None, max_model_len: int = 512,
                       pages_on_cpu: bool = True):
    """:class:`~vllm_seqkv.integration.fixed_memory.FixedMemory` of a seqkv engine for the model
    (built from its HF config, as the worker's engine codec is), and one block's page bytes per
    layer and KV head for block size 1 (times ``block_size * layers * kv_heads``: a block)."""
    from transformers import AutoConfig

    from vllm_seqkv.config import validate
    from vllm_seqkv.integration.engine_codec import EngineCodec
    from vllm_seqkv.integration.fixed_memory import fixed_memory_of

    config = AutoConfig.from_pretrained(model_dir)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    codec = EngineCodec(validate({"kv_cache_backend": "seqkv", **(seqkv_options or {})}), str(model_dir),
                        config.num_key_value_heads, head_dim, kv_dtype=config.dtype)  # vLLM's "auto"
    return fixed_memory_of(codec, config.num_hidden_layers, max_model_len,
                           pages_on_cpu=pages_on_cpu), codec.slot_bytes


def seqkv_budget_for_blocks(model_dir, blocks: int, seqkv_options: dict | None = None,
                            max_model_len: int = 512, block_size: int = 128) -> int:
    """``kv_cache_memory_bytes`` that gives a seqkv engine (CPU, uniform layers) exactly
    ``blocks`` blocks: their pages plus seqkv's fixed memory taken from the budget."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    fixed, slot_bytes = seqkv_fixed_memory(model_dir, seqkv_options, max_model_len)
    per_block = config.num_hidden_layers * config.num_key_value_heads * block_size * slot_bytes
    return fixed.budget_for(blocks, per_block, whole_budget=True, kv_on_host=True)
