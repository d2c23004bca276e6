"""csrc/ CUDA ops (torch.ops.seqkv) vs the torch reference, and torch.library.opcheck.

Needs a GPU and the built extension (scripts/gpu_check.sh builds it); skipped otherwise.
"""

import pytest
import torch

from tests.kernels.helpers import build_cache, seqkv3_layout
from vllm_seqkv.kernels import layer_params
from vllm_seqkv.kernels.cuda_ops import (
    decode_args,
    load_cuda_ops,
    paged_decode_attention_cuda,
    write_slots_args,
    write_slots_cuda,
)
from vllm_seqkv.kernels.reference import paged_decode_attention_reference, write_slots_reference

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
