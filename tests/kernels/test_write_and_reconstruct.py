"""Triton write path and page reconstruction vs the codec's own torch code."""

import pytest
import torch

from tests.kernels.conftest import ON_GPU
from tests.kernels.helpers import build_cache, seqkv3_layout
from vllm_seqkv.kernels import layer_params
from vllm_seqkv.kernels.checks import KernelArgumentError
from vllm_seqkv.kernels.rotation.reconstruct import reconstruct_blocks_triton
from vllm_seqkv.kernels.reference import reconstruct_blocks_reference, write_slots_reference
from vllm_seqkv.kernels.rotation.write import write_slots_triton


def new_tokens(tokens, heads, dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, heads, dim, generator=gen) * 2).to(dtype), torch.randn(
        tokens, heads, dim, generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dim", [32, 64, 128])
def test_write_slots_matches_codec_bytes(dim, block_size, dtype, device):
    heads, blocks = 2, 3
    layout = seqkv3_layout(heads, dim)
    key, value = new_tokens(5, heads, dim, dtype, seed=dim)
    slot_mapping = torch.tensor([0, block_size + 1, -1, 3 * block_size - 1, 7])  # -1 = padding
    expected = torch.randint(0, 256, (blocks, heads, block_size, layout.slot_bytes), dtype=torch.uint8)
    pages = expected.clone().to(device)
    write_slots_reference(key, value, slot_mapping, expected, layout)
    write_slots_triton(key.to(device), value.to(device), slot_mapping.to(device), pages,
                       layer_params(layout, device))
    differ = (pages.cpu() != expected).float().mean().item()
    # bit-identical on CPU; on GPU the fp32 Hadamard may round a value across a threshold
    assert differ == 0 if not ON_GPU else differ < 0.01


def test_write_then_decode_roundtrip_equals_codec(device):
    layout = seqkv3_layout(3, 64)
    key, value = new_tokens(4, 3, 64, torch.float32)
    pages = torch.zeros(1, 3, 16, layout.slot_bytes, dtype=torch.uint8, device=device)
    params = layer_params(layout, device)
    write_slots_triton(key.to(device), value.to(device), torch.arange(4, device=device), pages, params)
    k_hat, v_hat = reconstruct_blocks_triton(pages, torch.zeros(1, dtype=torch.int32, device=device), params)
    torch.testing.assert_close(k_hat[:4].cpu(), layout.key.roundtrip(key), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(v_hat[:4].cpu(), layout.value.roundtrip(value), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dim", [32, 64, 128])
def test_reconstruct_matches_reference(dim, block_size, device):
    cache = build_cache([block_size + 5, 2 * block_size], heads=3, dim=dim, block_size=block_size,
                        device=device, seed=dim)
    ids = cache.block_table.flatten()
    k, v = reconstruct_blocks_triton(cache.pages, ids, cache.params)
    k_ref, v_ref = reconstruct_blocks_reference(cache.pages, ids, cache.layout)
    assert k.shape == (ids.numel() * block_size, 3, dim)
    written = torch.cat([torch.arange(block_size + 5), torch.arange(2 * block_size, 4 * block_size)])
    # unwritten slots hold random bytes (garbage norms): compare the written tokens
    torch.testing.assert_close(k.cpu()[written], k_ref.cpu()[written], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(v.cpu()[written], v_ref.cpu()[written], atol=1e-4, rtol=1e-4)


def test_write_slots_bad_arguments(device):
    layout = seqkv3_layout(2, 32)
    params = layer_params(layout, device)
    pages = torch.zeros(2, 2, 16, layout.slot_bytes, dtype=torch.uint8, device=device)
    key, value = new_tokens(3, 2, 32, torch.float32)
    key, value, slots = key.to(device), value.to(device), torch.arange(3, device=device)
    with pytest.raises(KernelArgumentError, match="pages: expected shape"):
        write_slots_triton(key, value, slots, pages[:, :1], params)
    with pytest.raises(KernelArgumentError, match="value: expected shape"):
        write_slots_triton(key, value[:2], slots, pages, params)
    with pytest.raises(KernelArgumentError, match="slot_mapping: expected dtype"):
        write_slots_triton(key, value, slots.float(), pages, params)
    with pytest.raises(KernelArgumentError, match="key: expected dtype"):
        write_slots_triton(key.int(), value, slots, pages, params)
