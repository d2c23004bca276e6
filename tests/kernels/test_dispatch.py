"""Implementation choice, the public API on CPU, and the reference against the backend's attend."""

import logging
import os

import pytest
import torch

from tests.kernels.conftest import ON_GPU
from tests.kernels.helpers import build_cache
from vllm_seqkv import kernels
from vllm_seqkv.kernels.reference import paged_decode_attention_reference, write_slots_reference


def test_cpu_tensors_use_the_cpp_ops_when_built(monkeypatch, caplog):
    from vllm_seqkv.kernels.cpu_ops import load_cpu_ops, load_error

    if os.environ.get("SEQKV_NO_CPU_EXT") == "1":
        pytest.skip("SEQKV_NO_CPU_EXT=1")
    assert load_cpu_ops(), f"vllm_seqkv._cpu does not load: {load_error()}"
    monkeypatch.delenv("SEQKV_KERNELS", raising=False)
    kernels._announced.clear()
    with caplog.at_level(logging.INFO, logger="vllm.seqkv.kernels"):
        assert kernels.implementation(torch.device("cpu")) == "cpp"
    assert "cpp implementation on cpu" in caplog.text
    assert "not built" not in caplog.text


def test_missing_cpp_ops_fall_back_to_torch_with_one_warning(monkeypatch, caplog):
    from vllm_seqkv.kernels import cpu_ops

    monkeypatch.delenv("SEQKV_KERNELS", raising=False)
    monkeypatch.setattr(cpu_ops, "_loaded", False)
    monkeypatch.setattr(cpu_ops, "_error", "ImportError: no module named vllm_seqkv._cpu")
    kernels._announced.clear()
    with caplog.at_level(logging.INFO, logger="vllm.seqkv.kernels"):
        assert kernels.implementation(torch.device("cpu")) == "torch"
        assert kernels.implementation(torch.device("cpu")) == "torch"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].getMessage() == ("seqkv: C++ CPU kernels not built (ImportError: no module named "
                                        "vllm_seqkv._cpu); using the slow torch path")
    monkeypatch.setenv("SEQKV_KERNELS", "cpp")
    with pytest.raises(RuntimeError, match="not built"):
        kernels.implementation(torch.device("cpu"))
    kernels._announced.clear()


def test_cpp_runs_non_cross_layer_transform_layers_only(monkeypatch):
    from dataclasses import replace

    from tests.kernels.cpu_helpers import random_layout

    monkeypatch.setenv("SEQKV_KERNELS", "torch")
    params = kernels.layer_params(random_layout(2, 32, seed=1))
    assert not kernels.runs_kernel(params, torch.device("cpu"))
    if os.environ.get("SEQKV_NO_CPU_EXT") == "1":
        return
    monkeypatch.setenv("SEQKV_KERNELS", "cpp")
    assert kernels.runs_kernel(params, torch.device("cpu"))
    assert not kernels.runs_kernel(replace(params, key=replace(params.key, has_pred=True)), torch.device("cpu"))
    assert not kernels.runs_kernel(None, torch.device("cpu"))
    cache = build_cache([3], heads=1, dim=32, block_size=16, device="cpu")  # rotation format
    assert not kernels.runs_kernel(cache.params, torch.device("cpu"))


def test_transform_public_api_cpp_equals_torch(monkeypatch):
    """write / decode / reconstruct through the dispatcher: cpp against the torch reference."""
    from tests.kernels.cpu_helpers import random_layout, random_paged_case

    if os.environ.get("SEQKV_NO_CPU_EXT") == "1":
        pytest.skip("SEQKV_NO_CPU_EXT=1")
    layout = random_layout(2, 32, pair_keys=True, seed=3)
    params = kernels.layer_params(layout)
    pages, table, seq_lens = random_paged_case(layout, [7, 40], 16, seed=3)
    gen = torch.Generator().manual_seed(3)
    query, own = torch.randn(2, 4, 32, generator=gen), torch.randn(2, 2, 32, generator=gen)
    rope = kernels.rope_cache(48, 32, 10000.0)
    results = {}
    for choice in ("torch", "cpp"):
        monkeypatch.setenv("SEQKV_KERNELS", choice)
        written = pages.clone()
        kernels.write_slots(own, own * 2, torch.tensor([5, -1]), written, params)
        out, lse = kernels.paged_decode_attention(query, own, own, written, table, seq_lens, params, 0.2, rope=rope,
                                                  skip_first=1, return_lse=True)
        k, v = kernels.reconstruct_blocks(written, table[1], params, rope=rope,
                                          block_positions=torch.tensor([0, 16, 32]))
        results[choice] = (written, out, lse, k, v)
    assert torch.equal(results["torch"][0], results["cpp"][0])
    for a, b in zip(results["torch"][1:], results["cpp"][1:]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_env_override_and_bad_value(monkeypatch):
    monkeypatch.setenv("SEQKV_KERNELS", "triton")
    assert kernels.implementation(torch.device("cpu")) == "triton"
    monkeypatch.setenv("SEQKV_KERNELS", "fast")
    with pytest.raises(ValueError, match="SEQKV_KERNELS"):
        kernels.implementation(torch.device("cpu"))


@pytest.mark.parametrize("choice", ["torch", "triton", "cpp"])
def test_public_api_agrees_across_implementations(choice, monkeypatch, device):
    monkeypatch.setenv("SEQKV_KERNELS", choice)
    cache = build_cache([3, 18], heads=1, dim=32, block_size=16, device=device)
    gen = torch.Generator().manual_seed(0)
    query, own = (torch.randn(2, n, 32, generator=gen).to(device) for n in (2, 1))
    out = kernels.paged_decode_attention(query, own, own, cache.pages, cache.block_table,
                                         cache.seq_lens, cache.params, 0.2)
    ref = paged_decode_attention_reference(query, own, own, cache.pages, cache.block_table,
                                           cache.seq_lens, cache.layout, 0.2)
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    k, _ = kernels.reconstruct_blocks(cache.pages, cache.block_table[1], cache.params)
    assert k.shape == (32, 1, 32)
    pages, expected = cache.pages.clone(), cache.pages.clone()
    kernels.write_slots(own, own, torch.tensor([0, -1], device=device), pages, cache.params)
    write_slots_reference(own, own, torch.tensor([0, -1]), expected, cache.layout)
    assert (pages != expected).float().mean().item() < (0.01 if ON_GPU else 1e-12)


def test_reference_equals_backend_attend():
    """The kernels' reference is the backend's rule: decoded cache + exact own position."""
    backend = pytest.importorskip("vllm_seqkv.integration.backend", reason="needs vLLM")
    cache = build_cache([1, 21], heads=2, dim=32, block_size=16, device="cpu")
    gen = torch.Generator().manual_seed(1)
    query = torch.randn(2, 6, 32, generator=gen)
    own_k, own_v = torch.randn(2, 2, 32, generator=gen), torch.randn(2, 2, 32, generator=gen)
    ref = paged_decode_attention_reference(query, own_k, own_v, cache.pages, cache.block_table,
                                           cache.seq_lens, cache.layout, 0.3)
    for i, length in enumerate(cache.seq_lens.tolist()):
        blocks = cache.block_table[i, : -(-length // 16)].long()
        slots = cache.pages[blocks].transpose(1, 2).reshape(-1, 2, cache.pages.shape[3])[:length]
        k, v = cache.layout.decode(slots)
        expected = backend.attend(query[i:i + 1], k, v, own_k[i:i + 1], own_v[i:i + 1], 0.3)
        torch.testing.assert_close(ref[i], expected[0], atol=1e-5, rtol=1e-5)


def test_token_table_layer_has_no_kernel_params_and_says_so():
    from vllm_seqkv.codec.base import SlotLayout
    from vllm_seqkv.codec.token_table import TokenTableCodec

    table = TokenTableCodec(torch.randn(10, 2, 32))
    with pytest.raises(kernels.KernelArgumentError, match="token table"):
        kernels.layer_params(SlotLayout(table, table, 2, 32))
