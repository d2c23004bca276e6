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
