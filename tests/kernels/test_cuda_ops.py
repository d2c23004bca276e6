"""csrc/ CUDA ops (torch.ops.seqkv) vs the torch reference, and torch.library.opcheck.

Needs a GPU and the built extension (scripts/gpu_check.sh builds it); skipped otherwise.
Both slot formats: the rotation ops (write_slots, paged_decode_attention) and the transform
ops (write_transform_slots, transform_decode_attention; their per-element math is also checked
on CPU by test_transform_host.py, their thread/block structure only here).
"""

import pytest
import torch

from tests.kernels.helpers import build_cache, seqkv3_layout
from vllm_seqkv.kernels import layer_params
from tests.kernels.test_transform_decode import setup_case
from tests.kernels.test_transform_kernels import check_layered_write, dyadic_write_case
from tests.kernels.transform_helpers import FUSED_DECODE_CASES, TRANSFORM_TOLERANCES
from vllm_seqkv import kernels
from vllm_seqkv.kernels.cuda_ops import (
    decode_args,
    load_cuda_ops,
    paged_decode_attention_cuda,
    transform_decode_args,
    transform_decode_attention_cuda,
    write_slots_args,
    write_slots_cuda,
    write_transform_args,
    write_transform_slots_cuda,
)
from vllm_seqkv.kernels.reference import (
    paged_decode_attention_reference,
    transform_decode_attention_reference,
    write_slots_reference,
)
from vllm_seqkv.kernels.params import transform_layer_params

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and load_cuda_ops()),
                                reason="needs a GPU and the built vllm_seqkv._C extension")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("dim", [64, 128])
def test_decode_matches_reference(dim, group, dtype):
    cache = build_cache([1, 17, 300, 1000], heads=2, dim=dim, block_size=16, device="cuda")
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(4, 2 * group, dim, generator=gen).cuda().to(dtype)
    own_k, own_v = (torch.randn(4, 2, dim, generator=gen).cuda().to(dtype) for _ in range(2))
    out = paged_decode_attention_cuda(query, own_k, own_v, cache.pages, cache.block_table,
                                      cache.seq_lens, cache.params, dim ** -0.5)
    ref = paged_decode_attention_reference(query.float(), own_k.float(), own_v.float(), cache.pages,
                                           cache.block_table, cache.seq_lens, cache.layout, dim ** -0.5)
    tol = 2e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_write_matches_reference_bytes():
    layout = seqkv3_layout(2, 128)
    key, value = torch.randn(9, 2, 128), torch.randn(9, 2, 128)
    slots = torch.tensor([0, 5, -1, 17, 30, 31, 2, 9, 40])
    expected = torch.zeros(3, 2, 16, layout.slot_bytes, dtype=torch.uint8)
    pages = expected.cuda()
    write_slots_reference(key, value, slots, expected, layout)
    write_slots_cuda(key.cuda(), value.cuda(), slots.cuda(), pages, layer_params(layout, "cuda"))
    assert (pages.cpu() != expected).float().mean().item() < 0.01


def test_opcheck():
    cache = build_cache([5, 40], heads=2, dim=64, block_size=16, device="cuda")
    query = torch.randn(2, 4, 64, device="cuda")
    own = torch.randn(2, 2, 64, device="cuda")
    args = decode_args(query, own, own, cache.pages, cache.block_table, cache.seq_lens,
                       cache.params, 0.125)
    torch.library.opcheck(torch.ops.seqkv.paged_decode_attention.default, args)
    pages = cache.pages.clone()
    write_args = write_slots_args(own, own, torch.tensor([3, 70], device="cuda"), pages, cache.params)
    torch.library.opcheck(torch.ops.seqkv.write_slots.default, write_args)


# ---- transform format ---------------------------------------------------------------------


def test_transform_write_is_bit_exact_on_a_dyadic_grid():
    layout, key, value, previous, slot_mapping, before, expected = dyadic_write_case(41, skipped=[0, 33])
    pages = before.cuda()
    write_transform_slots_cuda(key.cuda(), value.cuda(), slot_mapping.cuda(), pages,
                               transform_layer_params(layout, "cuda"), tuple(p.cuda() for p in previous))
    assert torch.equal(pages.cpu(), expected)


@pytest.mark.parametrize("preset, heads, dim, block_size, dtype", [
    ("seqkv-3", 3, 64, 16, torch.float32),
    ("seqkv-2", 1, 32, 8, torch.bfloat16),
    ("seqkv-2.5", 2, 128, 16, torch.float16),
], ids=lambda v: str(v).replace("torch.", ""))
def test_transform_write_matches_codec_bytes(preset, heads, dim, block_size, dtype):
    def write(key, value, slot_mapping, pages, layout, previous):
        pages = pages.cuda()
        write_transform_slots_cuda(key.cuda(), value.cuda(), slot_mapping.cuda(), pages,
                                   transform_layer_params(layout, "cuda"),
                                   None if previous is None else tuple(p.cuda() for p in previous))
        return pages

    check_layered_write(write, preset, heads, dim, block_size, dtype, tokens=37, num_blocks=6,
                        skipped=[3, 20], capture_seed=dim + 3)


# (preset, kv heads, head_dim, GQA group, block size, layer, query dtype, rope, splits, skip_first)
TRANSFORM_DECODE_CASES = FUSED_DECODE_CASES + [  # and two larger ones
    ("seqkv-3", 2, 128, 8, 16, 1, torch.bfloat16, True, None, 0),
    ("seqkv-3-nox", 3, 128, 5, 16, 0, torch.float32, False, 7, 3),
]


@pytest.mark.parametrize("preset, heads, dim, group, block_size, layer, dtype, rope, splits, skip_first",
                         TRANSFORM_DECODE_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_transform_decode_matches_reference(preset, heads, dim, group, block_size, layer, dtype, rope, splits,
                                            skip_first):
    cache, params, previous, table, (query, own_k, own_v) = setup_case(
        preset, heads, dim, group, block_size, layer, dtype, rope, torch.device("cuda"))
    args = (query, own_k, own_v, cache.pages[layer], cache.block_table, cache.seq_lens)
    out, lse = transform_decode_attention_cuda(*args, params, dim ** -0.5, rope=table, previous=previous,
                                               num_splits=splits, skip_first=skip_first, return_lse=True)
    ref, ref_lse = transform_decode_attention_reference(
        query.float(), own_k.float(), own_v.float(), *args[3:], cache.layouts[layer], dim ** -0.5, rope=table,
        previous=previous, skip_first=skip_first, return_lse=True)
    assert out.dtype == dtype and out.shape == query.shape
    atol, rtol = TRANSFORM_TOLERANCES[dtype]
    torch.testing.assert_close(out.float().cpu(), ref.float().cpu(), atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.cpu(), ref_lse.cpu(), atol=1e-4, rtol=1e-4)


def test_transform_public_api_runs_the_cuda_ops(monkeypatch):
    monkeypatch.setenv("SEQKV_KERNELS", "cuda")
    cache, params, previous, table, (query, own_k, own_v) = setup_case(
        "seqkv-3", 1, 32, 2, 16, 1, torch.float32, True, torch.device("cuda"))
    args = (query, own_k, own_v, cache.pages[1], cache.block_table, cache.seq_lens)
    out = kernels.paged_decode_attention(*args, params, 0.3, rope=table, previous=previous)
    assert torch.equal(out, transform_decode_attention_cuda(*args, params, 0.3, rope=table, previous=previous))


def test_transform_opcheck():
    cache, params, previous, table, (query, own_k, own_v) = setup_case(
        "seqkv-3", 1, 32, 2, 16, 1, torch.float32, True, torch.device("cuda"))
    args = transform_decode_args(query, own_k, own_v, cache.pages[1], cache.block_table, cache.seq_lens, params,
                                 0.2, table, previous, 2, 3)
    torch.library.opcheck(torch.ops.seqkv.transform_decode_attention.default, args)
    key, value = (t[:3].cuda() for t in cache.tokens[1])
    prev3 = tuple(p.reshape(-1, 1, 32)[:3].contiguous() for p in previous)
    write_args = write_transform_args(key, value, torch.tensor([4, -1, 9], device="cuda"), cache.pages[1].clone(),
                                      params, prev3)
    torch.library.opcheck(torch.ops.seqkv.write_transform_slots.default, write_args)
