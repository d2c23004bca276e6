"""How many more KV tokens `--kv-cache-backend seqkv` fits, and at how many bits per element.

    python examples/capacity_gain.py [MODEL_DIR] [--kv-cache-memory-bytes N] [--preset P]

(``--preset``: default the serving default, ``seqkv-f4``.)

Starts vLLM twice with the same KV budget, once with its own cache (`auto`) and once with
seqkv, and prints the KV capacity vLLM itself reports (blocks x block size), the gain, and
the bits per K/V element: the preset's page slot size, and what the budget works out to per
cached element given vLLM's block count (all-in: seqkv's fixed memory, which it takes from the
budget, and the rounding of blocks included).
"""

import argparse
import gc

from vllm import LLM, SamplingParams

from vllm_seqkv.config import DEFAULT_PRESET


def capacity(model: str, backend: str, kv_bytes: int, preset: str) -> dict:
    extra = {"kv_cache_backend": backend}
    if backend == "seqkv":
        extra["seqkv"] = {"preset": preset}
    llm = LLM(model=model, max_model_len=1024, kv_cache_memory_bytes=kv_bytes,
              additional_config=extra, enforce_eager=True)
    try:
        config = llm.llm_engine.vllm_config
        cache, model_config = config.cache_config, config.model_config
        tokens = cache.num_gpu_blocks * cache.block_size
        elements_per_token = (2 * model_config.get_total_num_hidden_layers()
                              * model_config.get_total_num_kv_heads() * model_config.get_head_size())
        figures = {"tokens": tokens, "budget_bits_per_element": 8 * kv_bytes / (tokens * elements_per_token)}
        if backend == "seqkv":
            from vllm_seqkv.config import from_additional_config
            from vllm_seqkv.integration.plugin import cache_figures

            from prometheus_client import REGISTRY

            figures["slot_bits_per_element"] = cache_figures(
                from_additional_config(config.additional_config), model_config).bits_per_element
            figures["fixed_bytes_taken"] = int(REGISTRY.get_sample_value(
                "seqkv_fixed_bytes_taken_from_kv_budget", {"preset": preset}))
            out = llm.generate(["The Python standard library"], SamplingParams(max_tokens=12, temperature=0))
            figures["sample"] = out[0].outputs[0].text
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default=None, help="default: the bundled SmolLM2-135M")
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=256 << 20)
    parser.add_argument("--preset", default=DEFAULT_PRESET, help=f"seqkv preset (default {DEFAULT_PRESET})")
    args = parser.parse_args()
    if args.model is None:
        import seqkv_fixtures as fixtures

        args.model = str(fixtures.smollm2_dir())
    auto = capacity(args.model, "auto", args.kv_cache_memory_bytes, args.preset)
    seqkv = capacity(args.model, "seqkv", args.kv_cache_memory_bytes, args.preset)
    print(f"KV budget: {args.kv_cache_memory_bytes / 2**20:.0f} MiB, preset {args.preset}")
    print(f"auto : {auto['tokens']:>9,} tokens, {auto['budget_bits_per_element']:.2f} bits/element")
    print(f"seqkv: {seqkv['tokens']:>9,} tokens, {seqkv['budget_bits_per_element']:.2f} bits/element "
          f"({seqkv['slot_bits_per_element']:.2f} in the page slots)")
    print(f"seqkv fixed memory taken from the budget: {seqkv['fixed_bytes_taken']:,} bytes "
          "(token table, codec constants, RoPE tables, sink table bound)")
    print(f"capacity gain: {seqkv['tokens'] / auto['tokens']:.2f}x")
    print(f"sample generation on the compressed cache: {seqkv['sample']!r}")


if __name__ == "__main__":
    main()
