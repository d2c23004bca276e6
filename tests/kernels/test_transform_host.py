"""The transform CUDA ops' per-element math, run on CPU: csrc/transform_format.cuh compiled by g++.

``transform_host.cpp`` (next to this file) is a small C++ torch extension that registers the
ops' own schemas (csrc/transform_schema.h) as ``torch.ops.seqkv_host.*``, unpacks arguments with
the ops' own code (csrc/transform_args.h) and runs the same ``__host__ __device__`` functions as
the kernels in serial loops shaped like the kernels' blocks. Its arguments are built by
:mod:`vllm_seqkv.kernels.cuda_ops` (``write_transform_args``, ``transform_decode_args``), as for
the CUDA ops. Compared with the codec's torch reference: identical bytes on a dyadic grid (every
product and sum exact in float32), the Triton tests' tolerances otherwise.

What this does NOT check: the kernels' thread/block structure (indexing by thread, barriers,
shared-memory sizing, launch configuration); only tests/kernels/test_cuda_ops.py on a GPU does.
Skipped when no C++ compiler or ninja is available. The build (~30-60 s once) is cached in
torch's extension directory (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``);
ninja rebuilds it when the .cpp or a csrc header changes.
"""

import shutil
from pathlib import Path

import pytest
import torch

from tests.kernels.test_transform_decode import setup_case
from tests.kernels.test_transform_kernels import check_layered_write, dyadic_write_case
from tests.kernels.transform_helpers import FUSED_DECODE_CASES, TRANSFORM_TOLERANCES
from vllm_seqkv.kernels.cuda_ops import (
    register_transform_fakes,
    transform_decode_args,
    write_transform_args,
)
from vllm_seqkv.kernels.reference import transform_decode_attention_reference
from vllm_seqkv.kernels.decode import check_fused_args
from vllm_seqkv.kernels.params import transform_layer_params
from vllm_seqkv.kernels.write import check_write_args

HERE = Path(__file__).resolve().parent
CSRC = HERE.parents[1] / "csrc"


def _toolchain() -> bool:
    from torch.utils.cpp_extension import is_ninja_available

    return (shutil.which("c++") or shutil.which("g++")) is not None and is_ninja_available()


pytestmark = pytest.mark.skipif(not _toolchain(), reason="needs a C++ compiler and ninja")


@pytest.fixture(scope="module")
def host():
    from torch.utils.cpp_extension import load

    if not hasattr(torch.ops.seqkv_host, "write_transform_slots"):
        load(name="seqkv_transform_host", sources=[str(HERE / "transform_host.cpp")],
             extra_include_paths=[str(CSRC)], extra_cflags=["-O1"], is_python_module=False, verbose=False)
        register_transform_fakes("seqkv_host")
    return torch.ops.seqkv_host


def host_write(host, key, value, slot_mapping, pages, params, previous=None):
    previous = check_write_args(key, value, slot_mapping, pages, params, previous)
    host.write_transform_slots(*write_transform_args(key, value, slot_mapping, pages, params, previous))


def host_decode(host, query, own_k, own_v, pages, block_table, seq_lens, params, scale, rope=None,
                previous=None, num_splits=None, skip_first=0):
    previous = check_fused_args(query, own_k, own_v, pages, block_table, seq_lens, params, rope,
                                previous, skip_first)
    return host.transform_decode_attention(*transform_decode_args(
        query, own_k, own_v, pages, block_table, seq_lens, params, scale, rope, previous, num_splits, skip_first))


def test_host_write_is_bit_exact_on_a_dyadic_grid(host):
    layout, key, value, previous, slot_mapping, before, expected = dyadic_write_case(skipped=[5, 17])
    pages = before.clone()
    host_write(host, key, value, slot_mapping, pages, transform_layer_params(layout), previous)
    assert torch.equal(pages, expected)


# (preset, kv heads, head_dim, block size, key dtype): head dims 32/64/128, odd head counts
WRITE_CASES = [
    ("seqkv-3", 2, 64, 16, torch.float32),
    ("seqkv-2", 3, 32, 8, torch.bfloat16),
    ("seqkv-2.5", 1, 128, 16, torch.float16),
]


@pytest.mark.parametrize("preset, heads, dim, block_size, dtype", WRITE_CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_host_write_matches_codec_bytes_both_layers(host, preset, heads, dim, block_size, dtype):
    """Layer 0 and the cross-layer layer 1: bytes equal SlotLayout.encode's up to float32
    rounding of z across a threshold (the Triton write test's rule, check_flips)."""
    def write(key, value, slot_mapping, pages, layout, previous):
        host_write(host, key, value, slot_mapping, pages, transform_layer_params(layout), previous)
        return pages

    check_layered_write(write, preset, heads, dim, block_size, dtype, tokens=29, num_blocks=4,
                        skipped=[2, 11], capture_seed=dim + 5)



@pytest.mark.parametrize("preset, heads, dim, group, block_size, layer, dtype, rope, splits, skip_first",
                         FUSED_DECODE_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_host_decode_matches_reference(host, preset, heads, dim, group, block_size, layer, dtype, rope, splits,
                                       skip_first):
    cache, params, previous, table, (query, own_k, own_v) = setup_case(
        preset, heads, dim, group, block_size, layer, dtype, rope, torch.device("cpu"))
    args = (query, own_k, own_v, cache.pages[layer], cache.block_table, cache.seq_lens)
    out, lse = host_decode(host, *args, params, dim ** -0.5, rope=table, previous=previous, num_splits=splits,
                           skip_first=skip_first)
    ref, ref_lse = transform_decode_attention_reference(
        query.float(), own_k.float(), own_v.float(), *args[3:], cache.layouts[layer], dim ** -0.5, rope=table,
        previous=previous, skip_first=skip_first, return_lse=True)
    assert out.dtype == dtype and out.shape == query.shape and lse.shape == query.shape[:2]
    atol, rtol = TRANSFORM_TOLERANCES[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


def test_host_decode_bf16_previous_and_int64_table(host):
    """A bf16 ``previous`` (as a chain hands it up) and int64 block table / seq_lens."""
    cache, params, previous, table, (query, own_k, own_v) = setup_case(
        "seqkv-3", 2, 32, 2, 16, 1, torch.float32, True, torch.device("cpu"))
    prev16 = tuple(p.to(torch.bfloat16) for p in previous)
    args = (query, own_k, own_v, cache.pages[1], cache.block_table.long(), cache.seq_lens.long())
    out, _ = host_decode(host, *args, params, 0.2, rope=table, previous=prev16)
    ref = transform_decode_attention_reference(*args, cache.layouts[1], 0.2, rope=table,
                                               previous=tuple(p.float() for p in prev16))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_host_ops_pass_opcheck(host):
    """Schema (mutation of pages), fake implementations and dispatch of the shared schemas."""
    cache, params, previous, table, (query, own_k, own_v) = setup_case(
        "seqkv-3", 1, 32, 2, 16, 1, torch.float32, True, torch.device("cpu"))
    args = transform_decode_args(query, own_k, own_v, cache.pages[1], cache.block_table, cache.seq_lens, params,
                                 0.2, table, previous, 2, 3)
    torch.library.opcheck(host.transform_decode_attention.default, args)
    key, value = cache.tokens[1][0][:3], cache.tokens[1][1][:3]
    prev3 = tuple(p.reshape(-1, 1, 32)[:3].contiguous() for p in previous)
    write_args = write_transform_args(key, value, torch.tensor([4, -1, 9]), cache.pages[1].clone(), params, prev3)
    torch.library.opcheck(host.write_transform_slots.default, write_args)
