"""The Python API: `LLM(..., additional_config={"kv_cache_backend": "seqkv"})`."""

import gc

import pytest

pytestmark = pytest.mark.e2e


def impl_classes(worker):
    from vllm.model_executor.layers.attention.attention import Attention

    model = worker.model_runner.model
    return sorted({type(m.impl).__name__ for m in model.modules() if isinstance(m, Attention)})


def make_llm(model_dir, backend):
    from vllm import LLM

    return LLM(model=str(model_dir), max_model_len=256, kv_cache_memory_bytes=32 << 20,
               additional_config={"kv_cache_backend": backend}, seed=0)


@pytest.mark.parametrize("backend, impl", [("seqkv", "SeqKVAttentionImpl"),
                                           ("auto", "CPUAttentionBackendImpl")])
def test_llm_selects_backend_and_generates(tiny_model_dir, backend, impl, monkeypatch):
    from vllm import SamplingParams

    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # for collective_rpc(fn)
    llm = make_llm(tiny_model_dir, backend)
    try:
        assert llm.collective_rpc(impl_classes) == [[impl]]
        out = llm.generate(["The os module provides"], SamplingParams(max_tokens=8, temperature=0))
        assert len(out[0].outputs[0].token_ids) == 8
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
