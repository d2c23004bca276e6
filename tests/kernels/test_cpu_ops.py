"""The C++ CPU ops (csrc/cpu/, vllm_seqkv._cpu) against the torch reference, on every ISA the
CPU has (AVX-512, AVX2, portable): fused decode attention, write (identical bytes) and block
reconstruction, on odd shapes (head sizes, GQA/MQA, block sizes, mixed lengths, sinks, pair-
diagonal and general key inverses, random page bytes), plus torch.library.opcheck and the
wrappers' argument checks. The extension is built by scripts/setup.sh on every machine; these
tests fail (not skip) when it does not load, unless SEQKV_NO_CPU_EXT=1."""

import os
from dataclasses import replace

import pytest
import torch

from tests.kernels.cpu_helpers import random_layout, random_paged_case
from tests.kernels.transform_helpers import TRANSFORM_TOLERANCES, assert_threshold_flips, build_transform_cache
from vllm_seqkv.kernels import cpu_ops
from vllm_seqkv.kernels.checks import KernelArgumentError
from vllm_seqkv.codec.rope import rotate_by_table
from vllm_seqkv.kernels.reference import (
    merge_sink_rows,
    reconstruct_transform_reference,
    transform_decode_attention_reference,
    write_transform_reference,
)
from vllm_seqkv.kernels.params import rope_cache, transform_layer_params

pytestmark = pytest.mark.skipif(os.environ.get("SEQKV_NO_CPU_EXT") == "1", reason="SEQKV_NO_CPU_EXT=1")
THETA = 10000.0


def _isas() -> list[str]:
    assert cpu_ops.load_cpu_ops(), f"vllm_seqkv._cpu does not load: {cpu_ops.load_error()}"
    found = []
    for isa in ("avx512", "avx2", "scalar"):
        try:
            torch.ops.seqkv.cpu_kernel_isa(isa)
        except RuntimeError:
            continue
        found.append(isa)
    torch.ops.seqkv.cpu_kernel_isa("auto")
    return found


ISAS = _isas() if os.environ.get("SEQKV_NO_CPU_EXT") != "1" else []


def each_isa():
    """Runs the body once per ISA the CPU has (the reference is computed once per test)."""
    try:
        for isa in ISAS:
            torch.ops.seqkv.cpu_kernel_isa(isa)
            yield isa
    finally:
        torch.ops.seqkv.cpu_kernel_isa("auto")


# (kv heads, head_dim, GQA group, block size, seq_lens, skip_first, pair keys, rope, query dtype, splits)
DECODE_CASES = [
    (2, 32, 1, 16, [1, 16, 17, 40], 0, False, True, torch.float32, None),
    (3, 64, 3, 32, [5, 33, 100], 1, True, True, torch.float32, None),
    (2, 128, 4, 128, [1, 129, 300], 1, True, False, torch.bfloat16, None),
    (1, 64, 8, 16, [2, 77], 0, False, True, torch.float16, None),  # MQA
    (1, 128, 3, 16, [250], 0, False, True, torch.float32, 4),
    (2, 32, 4, 32, [1, 1, 2], 1, True, True, torch.float32, None),  # nothing cached / sink only
    (2, 64, 2, 16, [47, 3, 160, 1], 2, True, True, torch.float32, 3),
    (1, 64, 1, 16, [70, 33, 49], 1, True, True, torch.float32, 2),  # one query head: tiles scored in pairs, odd counts
]


def _decode_inputs(heads, dim, group, batch, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads * group, dim, generator=gen).to(dtype)
    own_k = torch.randn(batch, heads, dim, generator=gen).to(dtype)
    own_v = torch.randn(batch, heads, dim, generator=gen).to(dtype)
    return query, own_k, own_v


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"H{c[0]}-D{c[1]}-G{c[2]}-bs{c[3]}-skip{c[5]}-"
                         f"{'pair' if c[6] else 'general'}")
def test_decode_matches_reference(case):
    heads, dim, group, block_size, lens, skip, pair, use_rope, dtype, splits = case
    layout = random_layout(heads, dim, pair_keys=pair, seed=dim + heads)
    params = transform_layer_params(layout)
    assert (cpu_ops.key_pairs(params) is not None) == pair
    pages, table, seq_lens = random_paged_case(layout, lens, block_size, seed=len(lens))
    query, own_k, own_v = _decode_inputs(heads, dim, group, len(lens), dtype, seed=dim)
    # the reference reads whole blocks
    rope = rope_cache(-(-max(lens) // block_size) * block_size, dim, THETA) if use_rope else None
    ref, ref_lse = transform_decode_attention_reference(query, own_k, own_v, pages, table, seq_lens, layout, 0.17,
                                                        rope=rope, skip_first=skip, return_lse=True)
    atol, rtol = TRANSFORM_TOLERANCES[dtype]
    for _ in each_isa():
        out, lse = cpu_ops.transform_decode_attention_cpp(query, own_k, own_v, pages, table, seq_lens, params, 0.17,
                                                          rope=rope, skip_first=skip, num_splits=splits,
                                                          return_lse=True)
        assert out.dtype == dtype and out.shape == query.shape
        torch.testing.assert_close(out.float(), ref.float(), atol=max(atol, 1e-4), rtol=max(rtol, 1e-4))
        torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


# (kv heads, head_dim, GQA group, block size, seq_lens, skip_first, pair keys, query dtype): groups wider than
# the pair path's 8 registers and the value path's 4 (a shared prefix stacks its sequences' queries)
NO_OWN_CASES = [
    (3, 64, 48, 16, [6, 300], 4, True, torch.float32),
    (2, 32, 12, 32, [70], 0, True, torch.bfloat16),
    (1, 128, 9, 16, [129, 40], 1, False, torch.float32),
    (2, 64, 5, 16, [33], 2, True, torch.float32),
]


@pytest.mark.parametrize("case", NO_OWN_CASES, ids=lambda c: f"H{c[0]}-D{c[1]}-G{c[2]}-{'pair' if c[6] else 'general'}")
def test_decode_without_own_token_matches_reference(case):
    """own_k = own_v = None: the queries attend to positions < seq_len - 1 only."""
    heads, dim, group, block_size, lens, skip, pair, dtype = case
    layout = random_layout(heads, dim, pair_keys=pair, seed=group)
    params = transform_layer_params(layout)
    pages, table, seq_lens = random_paged_case(layout, lens, block_size, seed=group)
    query = _decode_inputs(heads, dim, group, len(lens), dtype, seed=group)[0]
    rope = rope_cache(-(-max(lens) // block_size) * block_size, dim, THETA)
    ref, ref_lse = transform_decode_attention_reference(query, None, None, pages, table, seq_lens, layout, 0.19,
                                                        rope=rope, skip_first=skip, return_lse=True)
    with_own = transform_decode_attention_reference(query, *_decode_inputs(heads, dim, group, len(lens), dtype, 1)[1:],
                                                    pages, table, seq_lens, layout, 0.19, rope=rope, skip_first=skip)
    assert not torch.allclose(with_own.float(), ref.float(), atol=1e-3)  # the own token would change it
    atol, rtol = TRANSFORM_TOLERANCES[dtype]
    for _ in each_isa():
        out, lse = cpu_ops.transform_decode_attention_cpp(query, None, None, pages, table, seq_lens, params, 0.19,
                                                          rope=rope, skip_first=skip, return_lse=True)
        torch.testing.assert_close(out.float(), ref.float(), atol=max(atol, 1e-4), rtol=max(rtol, 1e-4))
        torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)
    with pytest.raises(KernelArgumentError, match="both or neither"):
        cpu_ops.transform_decode_attention_cpp(query, query[:, :heads], None, pages, table, seq_lens, params, 0.19,
                                               rope=rope)
    with pytest.raises(RuntimeError, match="needs a cached position"):
        cpu_ops.transform_decode_attention_cpp(query, None, None, pages, table, torch.ones_like(seq_lens), params,
                                               0.19, rope=rope)


@pytest.mark.parametrize("heads,dim,group,sharers", [(3, 64, 3, 4), (2, 128, 4, 3), (1, 64, 9, 2)])
def test_shared_prefix_pass_merged_with_the_rest_equals_one_decode(heads, dim, group, sharers):
    """Cascade decode: the shared prefix read once with the sequences' queries stacked per KV head
    (no own token, exact sink rows merged) + each sequence's rest from the prefix's end, merged by
    the log-sum-exps = the fused decode of each whole sequence."""
    from vllm_seqkv.integration.decode_plan import merge_partial_attention, stack_sharers, unstack_sharers

    block_size, prefix_blocks, sinks = 16, 5, 2
    layout = random_layout(heads, dim, pair_keys=True, seed=sharers)
    params = transform_layer_params(layout)
    lens = [prefix_blocks * block_size + 1 + 13 * i for i in range(sharers)]
    pages, table, seq_lens = random_paged_case(layout, lens, block_size, seed=sharers)
    table[:, :prefix_blocks] = table[0, :prefix_blocks]  # the shared blocks
    query, own_k, own_v = _decode_inputs(heads, dim, group, sharers, torch.float32, seed=3)
    gen = torch.Generator().manual_seed(5)
    sink_k, sink_v = (torch.randn(1, sinks, heads, dim, generator=gen) for _ in range(2))
    rope = rope_cache(-(-max(lens) // block_size) * block_size, dim, THETA)
    expected = cpu_ops.transform_decode_attention_cpp(
        query, own_k, own_v, pages, table, seq_lens, params, 0.2, rope=rope, skip_first=sinks,
        sinks=(sink_k.expand(sharers, -1, -1, -1), sink_v.expand(sharers, -1, -1, -1)))
    length = prefix_blocks * block_size
    stacked = stack_sharers(query, heads)
    for _ in each_isa():
        head, head_lse = unstack_sharers(*cpu_ops.transform_decode_attention_cpp(
            stacked, None, None, pages, table[:1, :prefix_blocks], torch.tensor([length + 1]), params,
            0.2, rope=rope, skip_first=sinks, return_lse=True, sinks=(sink_k, sink_v)), sharers, heads)
        rest, rest_lse = cpu_ops.transform_decode_attention_cpp(query, own_k, own_v, pages, table, seq_lens, params,
                                                                0.2, rope=rope, skip_first=length, return_lse=True)
        torch.testing.assert_close(merge_partial_attention(head, head_lse, rest, rest_lse), expected,
                                   atol=1e-5, rtol=1e-4)


# (kv heads, head_dim, GQA group, block size, seq_lens, sinks, pair keys, sink dtype)
SINK_CASES = [
    (3, 64, 3, 32, [1, 2, 5, 70], 1, True, torch.float32),  # a sequence with no cached position, one sink only
    (2, 32, 4, 16, [3, 4, 5, 40], 4, False, torch.bfloat16),  # fewer cached positions than sinks
    (1, 128, 8, 16, [130, 17], 2, True, torch.float32),  # MQA
]


@pytest.mark.parametrize("case", SINK_CASES, ids=lambda c: f"H{c[0]}-D{c[1]}-G{c[2]}-S{c[5]}")
def test_decode_merges_exact_sink_rows(case, monkeypatch):
    """Exact rows of positions 0..S-1 merged inside the op = the op without them + the torch
    log-sum-exp merge (merge_sink_rows); the dispatcher's torch path merges the same way."""
    from vllm_seqkv import kernels

    heads, dim, group, block_size, lens, sinks, pair, sink_dtype = case
    layout = random_layout(heads, dim, pair_keys=pair, seed=dim + sinks)
    params = transform_layer_params(layout)
    pages, table, seq_lens = random_paged_case(layout, lens, block_size, seed=sinks)
    query, own_k, own_v = _decode_inputs(heads, dim, group, len(lens), torch.float32, seed=sinks)
    gen = torch.Generator().manual_seed(7)
    sink_k = (3 * torch.randn(len(lens), sinks, heads, dim, generator=gen)).to(sink_dtype)  # scores that matter
    sink_v = torch.randn(len(lens), sinks, heads, dim, generator=gen).to(sink_dtype)
    rope = rope_cache(-(-max(lens) // block_size) * block_size, dim, THETA)
    ref, ref_lse = transform_decode_attention_reference(query, own_k, own_v, pages, table, seq_lens, layout, 0.21,
                                                        rope=rope, skip_first=sinks, return_lse=True)
    expected = merge_sink_rows(ref, ref_lse, query, sink_k, sink_v, seq_lens, 0.21)
    assert not torch.allclose(expected, ref, atol=1e-3)  # the sinks change the result
    for _ in each_isa():
        out = cpu_ops.transform_decode_attention_cpp(query, own_k, own_v, pages, table, seq_lens, params, 0.21,
                                                     rope=rope, skip_first=sinks, sinks=(sink_k, sink_v))
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    for implementation in ("cpp", "torch"):  # the op merges / the dispatcher merges the reference's result
        monkeypatch.setenv("SEQKV_KERNELS", implementation)
        out = kernels.paged_decode_attention(query, own_k, own_v, pages, table, seq_lens, params, 0.21, rope=rope,
                                             skip_first=sinks, sinks=(sink_k, sink_v))
        torch.testing.assert_close(out.float(), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(KernelArgumentError, match="skip_first"):
        cpu_ops.transform_decode_attention_cpp(query, own_k, own_v, pages, table, seq_lens, params, 0.21, rope=rope,
                                               skip_first=sinks - 1, sinks=(sink_k, sink_v))


@pytest.mark.parametrize("heads,dim,block_size,dtype,magnitude",
                         [(1, 32, 16, torch.float32, 1.0), (3, 64, 32, torch.bfloat16, 1.0),
                          (2, 128, 16, torch.float16, 1.25)])
def test_write_tokens_codes_like_the_codec(heads, dim, block_size, dtype, magnitude):
    """The engine's one-op write from post-RoPE K/V (RoPE table with a magnitude, as YaRN's) =
    un-rotating in torch + the codec's encode, byte for byte up to threshold flips (the op
    computes the components with its own multiply-adds); NaN/inf tokens flagged and stored as 0;
    slot -1 skipped."""
    layout = random_layout(heads, dim, key_bits=3.5, value_bits=4.5, pair_keys=True, seed=dim + 1)
    params = transform_layer_params(layout)
    pages, _, _ = random_paged_case(layout, [4 * block_size], block_size, seed=3)
    gen = torch.Generator().manual_seed(dim)
    tokens = 41
    positions = torch.randint(0, 4 * block_size, (tokens,), generator=gen)
    table = rope_cache(4 * block_size, dim, THETA) * magnitude
    pre_key = torch.randn(tokens, heads, dim, generator=gen) * 2
    key = rotate_by_table(pre_key, table, positions).to(dtype)
    value = (torch.randn(tokens, heads, dim, generator=gen) * 2).to(dtype)
    key[5, 0, 3] = float("nan")
    value[9, heads - 1, 0] = float("inf")
    slots = torch.randperm(pages.shape[0] * block_size, generator=gen)[:tokens]
    slots[[0, 17]] = -1
    from vllm_seqkv.codec.rope import unrotate_by_table

    clean_key = torch.nan_to_num(key.float(), nan=0.0, posinf=0.0, neginf=0.0)
    clean_value = torch.nan_to_num(value.float(), nan=0.0, posinf=0.0, neginf=0.0)
    expected = pages.clone()
    write_transform_reference(unrotate_by_table(clean_key, table, positions), clean_value, slots, expected, layout)
    written = slots[slots >= 0]
    block, offset = written // block_size, written % block_size
    for _ in each_isa():
        ours = pages.clone()
        nonfinite = cpu_ops.write_transform_tokens_cpp(key, value, slots, positions, ours, params, rope=table)
        assert nonfinite.item() == 2  # tokens 5 and 9
        untouched = torch.ones(pages.shape[0] * block_size, dtype=torch.bool)
        untouched[written] = False
        assert torch.equal(ours.transpose(1, 2).reshape(-1, heads, pages.shape[3])[untouched],
                           pages.transpose(1, 2).reshape(-1, heads, pages.shape[3])[untouched])
        coded_key = unrotate_by_table(clean_key, table, positions)
        assert_threshold_flips(ours[block, :, offset], expected[block, :, offset], coded_key[slots >= 0],
                               clean_value[slots >= 0], params)
    with pytest.raises(KernelArgumentError, match="positions"):
        cpu_ops.write_transform_tokens_cpp(key, value, slots, positions[:3], pages.clone(), params, rope=table)
    with pytest.raises(RuntimeError, match="rope"):
        cpu_ops.write_transform_tokens_cpp(key, value, slots, positions, pages.clone(), params, rope=table[:2])


def test_pair_path_equals_general_path():
    """The same pair-diagonal key inverse through the O(1)-per-pair path and the D^2 path."""
    layout = random_layout(2, 64, pair_keys=True, seed=5)
    params = transform_layer_params(layout)
    pages, table, seq_lens = random_paged_case(layout, [90, 31], 32, seed=2)
    query, own_k, own_v = _decode_inputs(2, 64, 2, 2, torch.float32, seed=3)
    rope = rope_cache(128, 64, THETA)
    k, v = params.key, params.value
    args = (query, own_k, own_v, pages, table, seq_lens, rope, cpu_ops.stream_tables(k), cpu_ops.stream_tables(v),
            cpu_ops.stream_format(k), cpu_ops.stream_format(v))
    for _ in each_isa():
        fast = torch.ops.seqkv.cpu_transform_decode_attention(*args, cpu_ops.key_pairs(params), 0.2, 0, 1)
        slow = torch.ops.seqkv.cpu_transform_decode_attention(*args, None, 0.2, 0, 1)
        for a, b in zip(fast, slow):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # ~12 s: fitting the synthetic calibration
def test_real_preset_layer_matches_reference():
    """seqkv-3-nox as calibrated (synthetic calibration): the preset's own codecs and slot format."""
    cache = build_transform_cache("seqkv-3-nox", 1, 32, 32, [3, 70, 33], seed=4)
    layout = cache.layouts[1]
    params = cache.params(1, "cpu")
    query, own_k, own_v = _decode_inputs(1, 32, 3, 3, torch.float32, seed=4)
    rope = rope_cache(96, 32, THETA)
    ref, ref_lse = transform_decode_attention_reference(query, own_k, own_v, cache.pages[1], cache.block_table,
                                                        cache.seq_lens, layout, 0.125, rope=rope, skip_first=1,
                                                        return_lse=True)
    for _ in each_isa():
        out, lse = cpu_ops.transform_decode_attention_cpp(query, own_k, own_v, cache.pages[1], cache.block_table,
                                                          cache.seq_lens, params, 0.125, rope=rope, skip_first=1,
                                                          return_lse=True)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("heads,dim,block_size,dtype", [(1, 32, 16, torch.float32), (3, 64, 32, torch.bfloat16),
                                                        (2, 128, 128, torch.float16)])
def test_write_bytes_identical_to_reference(heads, dim, block_size, dtype):
    layout = random_layout(heads, dim, key_bits=2.5, value_bits=3.5, seed=dim)
    params = transform_layer_params(layout)
    pages, _, _ = random_paged_case(layout, [3 * block_size], block_size, seed=1)
    gen = torch.Generator().manual_seed(dim)
    tokens = 37
    key = (torch.randn(tokens, heads, dim, generator=gen) * 2).to(dtype)
    value = (torch.randn(tokens, heads, dim, generator=gen) * 2).to(dtype)
    slots = torch.randperm(pages.shape[0] * block_size, generator=gen)[:tokens]
    slots[[0, 11, 36]] = -1
    expected = pages.clone()
    write_transform_reference(key, value, slots, expected, layout)
    for _ in each_isa():
        ours = pages.clone()
        cpu_ops.write_transform_slots_cpp(key, value, slots, ours, params)
        assert torch.equal(ours, expected)
        cpu_ops.write_transform_slots_cpp(key[:0], value[:0], slots[:0], ours, params)  # nothing to write
        assert torch.equal(ours, expected)


# (kv heads, head_dim, block size): blocks read 16 slots at a time (24: a partial last tile),
# value rebuilds with register accumulators (64, 128) or without (96: 6 or 12 vectors)
@pytest.mark.parametrize("heads,dim,block_size", [(2, 64, 32), (3, 96, 24), (1, 128, 16)])
@pytest.mark.parametrize("pair,use_rope", [(False, True), (True, True), (True, False)])
def test_reconstruct_matches_reference(pair, use_rope, heads, dim, block_size):
    layout = random_layout(heads, dim, pair_keys=pair, seed=9)
    params = transform_layer_params(layout)
    pages, table, _ = random_paged_case(layout, [100], block_size, seed=9)
    ids = torch.cat([table[0], torch.tensor([-1], dtype=torch.int32)])
    positions = torch.arange(ids.numel()) * block_size if use_rope else None
    rope = rope_cache(ids.numel() * block_size, dim, THETA) if use_rope else None
    ref_k, ref_v = reconstruct_transform_reference(pages, ids, layout, rope=rope, block_positions=positions)[:2]
    for _ in each_isa():
        key, value = cpu_ops.reconstruct_transform_blocks_cpp(pages, ids, params, rope=rope,
                                                              block_positions=positions)
        torch.testing.assert_close(key, ref_k, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(value, ref_v, atol=1e-4, rtol=1e-4)
        assert not key[-block_size:].any() and not value[-block_size:].any()


def test_opcheck():
    layout = random_layout(2, 32, pair_keys=True, seed=1)
    params = transform_layer_params(layout)
    pages, table, seq_lens = random_paged_case(layout, [20, 5], 16, seed=1)
    query, own_k, own_v = _decode_inputs(2, 32, 2, 2, torch.float32, seed=1)
    k, v = params.key, params.value
    tables = (cpu_ops.stream_tables(k), cpu_ops.stream_tables(v), cpu_ops.stream_format(k), cpu_ops.stream_format(v))
    rope = rope_cache(32, 32, THETA)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.seqkv.cpu_transform_decode_attention,
                          (query, own_k, own_v, pages, table, seq_lens, rope, *tables, cpu_ops.key_pairs(params),
                           0.3, 0, 1), test_utils=tests)
    torch.library.opcheck(torch.ops.seqkv.cpu_reconstruct_transform_blocks,
                          (pages, table[0], rope, torch.tensor([0, 16]), *tables, None), test_utils=tests)
    z = torch.randn(3, 2, 32)
    torch.library.opcheck(torch.ops.seqkv.cpu_write_transform_slots,
                          (z, z.clone(), torch.tensor([0, -1, 7]), pages.clone(), *tables), test_utils=tests)
    torch.library.opcheck(torch.ops.seqkv.cpu_write_transform_tokens,
                          (z, z.clone(), torch.tensor([0, -1, 7]), torch.tensor([0, 3, 7]), pages.clone(), rope,
                           *tables), test_utils=tests)
    sinks = torch.randn(2, 1, 2, 32)
    torch.library.opcheck(torch.ops.seqkv.cpu_transform_decode_attention,
                          (query, own_k, own_v, pages, table, seq_lens, rope, *tables, cpu_ops.key_pairs(params),
                           0.3, 0, 1, sinks, sinks.clone()), test_utils=tests)
    # NOTE: not with layer_tables: opcheck runs the op on copies of the arguments, and layer
    # tables of other tensors than the call's are refused (test_layer_tables_built_once_...)


def test_layer_tables_built_once_give_the_per_call_results_and_are_checked():
    """The ops' layer tables built once (cpu_transform_layer_tables, what the wrappers pass) give
    the same bits as tables built inside each call; tables of other tensors are refused."""
    heads, dim, group = 3, 64, 3
    layout = random_layout(heads, dim, pair_keys=True, seed=5)
    params = transform_layer_params(layout)
    pages, table, seq_lens = random_paged_case(layout, [3, 40, 150], 16, seed=5)
    query, own_k, own_v = _decode_inputs(heads, dim, group, 3, torch.float32, seed=5)
    rope = rope_cache(160, dim, THETA)
    args = cpu_ops.layer_args(params)
    sinks = torch.randn(3, 2, heads, dim), torch.randn(3, 2, heads, dim)

    def decode(rope, layer_tables=None, pairs=args.pairs, k_tables=args.k_tables):
        return torch.ops.seqkv.cpu_transform_decode_attention(
            query, own_k, own_v, pages, table, seq_lens, rope, k_tables, args.v_tables, args.k_format,
            args.v_format, pairs, 0.2, 0, 2, *sinks, layer_tables)

    for use_rope in (rope, None):
        prepared = torch.ops.seqkv.cpu_transform_layer_tables(pages, args.k_tables, args.v_tables, args.k_format,
                                                              args.v_format, args.pairs, use_rope)
        for _ in each_isa():
            for built, once in zip(decode(use_rope), decode(use_rope, prepared)):
                assert torch.equal(built, once)
    prepared = args.layer_tables(pages, rope)
    assert args.layer_tables(pages, rope) is prepared and args.any_tables(pages) is prepared  # kept per layer
    assert cpu_ops.layer_args(params) is args
    assert cpu_ops.layer_args(replace(params)) is not args  # a copy derives its own
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(5, heads, dim, generator=gen)
    slots = torch.tensor([0, 3, -1, 17, 40])
    written = [pages.clone(), pages.clone()]
    torch.ops.seqkv.cpu_write_transform_slots(z, z * 0.5, slots, written[0], args.k_tables, args.v_tables,
                                              args.k_format, args.v_format)
    torch.ops.seqkv.cpu_write_transform_slots(z, z * 0.5, slots, written[1], args.k_tables, args.v_tables,
                                              args.k_format, args.v_format, prepared)
    assert torch.equal(written[0], written[1]) and not torch.equal(written[0], pages)
    other = transform_layer_params(random_layout(heads, dim, pair_keys=True, seed=6))
    with pytest.raises(RuntimeError, match="built from other codec tables"):
        decode(rope, cpu_ops._LayerArgs(other).layer_tables(pages, rope))
    with pytest.raises(RuntimeError, match="another rope"):
        decode(rope.clone(), prepared)
    with pytest.raises(RuntimeError, match="another rope"):
        decode(None, prepared)
    with pytest.raises(RuntimeError, match="another rope"):
        decode(rope, prepared, pairs=None)
    with pytest.raises(RuntimeError, match="built from other codec tables"):
        decode(rope, prepared, k_tables=[t.clone() for t in args.k_tables])
    tampered = prepared.clone()
    tampered[0] += 1
    with pytest.raises(RuntimeError, match="magic"):
        decode(rope, tampered)
    with pytest.raises(RuntimeError, match="magic"):
        decode(rope, prepared[:-1])
    lying = prepared.clone()
    lying[11:13] = 1 - lying[11:13]  # header flags of another layout, size unchanged
    with pytest.raises(RuntimeError, match="magic"):
        decode(rope, lying)
    with pytest.raises(RuntimeError, match="int32"):
        decode(rope, prepared.float())
    for other_size in (pages[..., :-1], torch.zeros(*pages.shape[:3], pages.shape[3] + 1, dtype=torch.uint8)):
        with pytest.raises(RuntimeError, match="slot"):  # the pages of another slot size
            torch.ops.seqkv.cpu_transform_layer_tables(other_size, args.k_tables, args.v_tables, args.k_format,
                                                       args.v_format, args.pairs, rope)
        with pytest.raises(KernelArgumentError, match="pages"):  # the wrapper names the argument
            cpu_ops.transform_decode_attention_cpp(query, own_k, own_v, other_size, table, seq_lens, params, 0.2,
                                                   rope=rope)


def test_wrappers_check_arguments():
    layout = random_layout(2, 32, seed=2)
    params = transform_layer_params(layout)
    pages, table, seq_lens = random_paged_case(layout, [20], 16, seed=2)
    query, own_k, own_v = _decode_inputs(2, 32, 2, 1, torch.float32, seed=2)
    decode = cpu_ops.transform_decode_attention_cpp
    with pytest.raises(KernelArgumentError, match="query"):
        decode(query[..., :16], own_k, own_v, pages, table, seq_lens, params, 0.1)
    with pytest.raises(KernelArgumentError, match="own_k"):
        decode(query, own_k[:, :1], own_v, pages, table, seq_lens, params, 0.1)
    with pytest.raises(KernelArgumentError, match="block_table"):
        decode(query, own_k, own_v, pages, table.float(), seq_lens, params, 0.1)
    with pytest.raises(KernelArgumentError, match="pages"):
        decode(query, own_k, own_v, pages.to(torch.int8), table, seq_lens, params, 0.1)
    with pytest.raises(KernelArgumentError, match="rope"):
        decode(query, own_k, own_v, pages, table, seq_lens, params, 0.1, rope=rope_cache(4, 32, THETA))
    with pytest.raises(RuntimeError, match="seq_lens"):  # beyond the block table's capacity: the op refuses
        decode(query, own_k, own_v, pages, table, seq_lens + 100, params, 0.1)
    cross = replace(params, key=replace(params.key, has_pred=True))  # a cross-layer predicted layer
    with pytest.raises(KernelArgumentError, match="cross-layer"):
        cpu_ops.write_transform_slots_cpp(own_k, own_v, torch.tensor([0]), pages, cross)
    with pytest.raises(KernelArgumentError, match="cross-layer"):
        decode(query, own_k, own_v, pages, table, seq_lens, cross, 0.1)
    with pytest.raises(KernelArgumentError, match="slot_mapping"):
        cpu_ops.write_transform_slots_cpp(own_k, own_v, torch.tensor([0.0]), pages, params)
    with pytest.raises(KernelArgumentError, match="block_positions"):
        cpu_ops.reconstruct_transform_blocks_cpp(pages, table[0], params, rope=rope_cache(64, 32, THETA))
    # packed level tables: a component whose 2**nbits entries run past the table is refused
    shifted = replace(params, value=replace(params.value, level_start=params.value.level_start + 1))
    with pytest.raises(RuntimeError, match="level_start out of range"):
        decode(query, own_k, own_v, pages, table, seq_lens, shifted, 0.1)
    with pytest.raises(RuntimeError, match="level_start out of range"):
        cpu_ops.write_transform_slots_cpp(own_k, own_v, torch.tensor([0]), pages.clone(), shifted)
    short = replace(params, key=replace(params.key, levels=params.key.levels[:-1].contiguous(),
                                        cuts=params.key.cuts[:-1].contiguous()))
    with pytest.raises(RuntimeError, match="level_start out of range"):
        decode(query, own_k, own_v, pages, table, seq_lens, short, 0.1)


def test_pair_blocks_detection():
    inverse = torch.zeros(1, 4, 4)
    inverse[0, [0, 1, 2, 3], [0, 1, 2, 3]] = 1.0
    inverse[0, 0, 2] = 0.5  # pair {0, 2}
    blocks = cpu_ops.pair_blocks(inverse)
    assert blocks is not None and blocks.shape == (4, 1, 2)
    assert blocks[2, 0, 0] == 0.5  # c = inverse[j, j + D/2]
    inverse[0, 0, 1] = 1e-30  # not a pair
    assert cpu_ops.pair_blocks(inverse) is None
