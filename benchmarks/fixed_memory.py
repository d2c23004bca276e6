"""What seqkv's engine codec holds outside the KV pages, measured in the worker, against what
it counts, and the greedy tokens it serves meanwhile (to compare two checkouts).

    python -m benchmarks.fixed_memory --preset seqkv-f4 [--model DIR] [--kv-cache-memory-bytes N]

Starts SmolLM2-135M (default) with ``--kv-cache-memory-bytes`` (default 256 MiB) and
``max_model_len`` 1024, generates 48 greedy tokens for 6 held-out prose prompts of 5-600 tokens
and one short prompt (batched), then for one prompt alone, and reads in the worker (through
``collective_rpc``) the distinct tensor storages the engine codec holds per part. Prints one
JSON line: the counted parts (``/metrics`` gauges), the held bytes, vLLM's block count, and a
SHA-256 of the greedy token ids (equal digests: the same tokens).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os


def held_bytes(worker) -> dict:
    """In the worker: bytes of the distinct storages of each part the engine codec holds."""
    from vllm_seqkv.codec.token_table import TokenTableCodec
    from vllm_seqkv.integration.engine_codec import active_engine_codec
    from vllm_seqkv.integration.fixed_memory import tensor_storages

    engine = active_engine_codec()

    ropes = engine._layer_rope.values()
    rope = tensor_storages([(r.table, *r._tables.values(), *r._rotations.values()) for r in ropes])
    sinks = tensor_storages(list(engine.sinks._exact.values()))
    tables = [c for layer in engine.layers() for c in (engine.layout(layer).key, engine.layout(layer).value)
              if isinstance(c, TokenTableCodec)]
    token = tensor_storages([(c.table, c._search, c._sq_norms) for c in tables])
    codec = tensor_storages(engine.codec, skip=(TokenTableCodec,))
    params = tensor_storages([p for p in engine._kernel_params.values() if p is not None])
    return {"token_table": sum(token.values()),
            "calibration": sum(size for key, size in codec.items() if key not in token),
            "kernel_params": sum(size for key, size in params.items() if key not in codec),
            "rope_tables": sum(rope.values()), "rope_layers": len(engine._layer_rope),
            "sink_rows": sum(sinks.values()), "sink_entries": len(engine.sinks)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="seqkv-f4")
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M")
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=256 << 20)
    args = parser.parse_args()
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc(held_bytes)
    from prometheus_client import REGISTRY
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import seqkv_fixtures as fixtures

    model = args.model or str(fixtures.smollm2_dir())
    llm = LLM(model=model, max_model_len=1024, kv_cache_memory_bytes=args.kv_cache_memory_bytes, seed=0,
              enforce_eager=True, additional_config={"kv_cache_backend": "seqkv", "seqkv": {"preset": args.preset}})
    try:
        tokenizer = llm.get_tokenizer()
        ids = tokenizer(fixtures.prose_path("test").read_text()[:20000])["input_ids"]
        prompts = [ids[i * 37:i * 37 + n] for i, n in enumerate([5, 40, 200, 600, 33, 129])]
        prompts.append(tokenizer("The Python standard library")["input_ids"])
        greedy = SamplingParams(max_tokens=48, temperature=0)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], greedy, use_tqdm=False)
        alone = llm.generate([TokensPrompt(prompt_token_ids=prompts[2])], greedy, use_tqdm=False)
        tokens = [list(o.outputs[0].token_ids) for o in outs + alone]
        counted = {part: int(REGISTRY.get_sample_value("seqkv_fixed_bytes", {"preset": args.preset, "part": part}))
                   for part in ("token_table", "calibration", "kernel_params", "rope_tables", "sink_table")}
        print(json.dumps({
            "preset": args.preset, "kv_cache_memory_bytes": args.kv_cache_memory_bytes,
            "blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks, "counted": counted,
            "held": llm.collective_rpc(held_bytes)[0],
            "greedy_sha256": hashlib.sha256(json.dumps(tokens).encode()).hexdigest()}), flush=True)
    finally:
        llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
