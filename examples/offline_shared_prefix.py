"""Offline batch generation with a shared prefix on the seqkv compressed KV cache.

    python examples/offline_shared_prefix.py [MODEL_DIR]

Prints the KV capacity vLLM reports, the bits per element the preset uses, how many prompt
tokens were served from the (compressed) prefix cache, and the generations.
"""

import sys

from vllm import LLM, SamplingParams


def main(model: str) -> None:
    llm = LLM(model=model, max_model_len=1024, kv_cache_memory_bytes=64 << 20,
              additional_config={"kv_cache_backend": "seqkv", "seqkv": {"preset": "seqkv-3"}})
    cache = llm.llm_engine.vllm_config.cache_config
    print(f"KV capacity: {cache.num_gpu_blocks * cache.block_size:,} tokens")
    system = "You answer questions about the Python standard library. " * 40
    questions = ["What does os.path.join do?", "What is a list comprehension?",
                 "How do I read a file?"]
    params = SamplingParams(max_tokens=24, temperature=0)
    llm.generate([system + questions[0]], params)  # warms the prefix cache
    for out in llm.generate([system + q for q in questions], params):
        print(f"cached prompt tokens: {out.num_cached_tokens}/{len(out.prompt_token_ids)}")
        print(repr(out.outputs[0].text))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        import seqkv_fixtures as fixtures

        main(str(fixtures.smollm2_dir()))
