"""Transform-format kernels (seqkv-2/2.5/3/4, -nox) vs the codec's own SlotLayout code.

Small on purpose: every case runs in Triton's interpreter on CPU (TRITON_INTERPRET=1).
"""

import pytest
import torch

from vllm_seqkv.codec.presets import PRESETS

from tests.kernels.conftest import ON_GPU
from tests.kernels.transform_helpers import (
    THETA,
    TRANSFORM_TOLERANCES,
    build_transform_cache,
    stream_codes,
    transform_layouts,
)
from vllm_seqkv import kernels
from vllm_seqkv.codec.base import SlotLayout
from vllm_seqkv.codec.crosslayer import CrossLayerCodec, LinearPredictor
from vllm_seqkv.codec.rope import rope_tables
from vllm_seqkv.codec.transform import Transform, TransformCodec
from vllm_seqkv.kernels.checks import KernelArgumentError
from vllm_seqkv.kernels.reference import (
    reconstruct_transform_reference,
    transform_decode_attention_reference,
    write_transform_reference,
)
from vllm_seqkv.kernels.params import rope_cache, transform_layer_params
from vllm_seqkv.kernels.reconstruct import (
    reconstruct_transform_blocks,
    reconstruct_transform_table,
    table_block_ids,
    transform_decode_attention,
)
from vllm_seqkv.kernels.write import write_transform_slots

# (preset, kv heads, head_dim, block size, output dtype, rope): every head size, bit budget,
# block size and output dtype at least once, odd head counts, keys with and without RoPE
RECONSTRUCT_CASES = [
    ("seqkv-3", 2, 64, 16, torch.float32, True),
    ("seqkv-2", 3, 32, 16, torch.bfloat16, False),
    ("seqkv-4", 1, 128, 128, torch.float32, True),
    ("seqkv-2.5", 2, 128, 16, torch.float16, True),
    ("seqkv-3-nox", 1, 32, 128, torch.float32, False),
    ("seqkv-f4", 2, 64, 16, torch.float32, True),  # the default: RoPE-pair key basis, layer 0 coded
]


def lengths_for(block_size):
    return [1, block_size + 3, 2 * block_size + 5] if block_size <= 16 else [1, block_size + 2]


def close(out, ref, dtype):
    atol, rtol = TRANSFORM_TOLERANCES[dtype]
    torch.testing.assert_close(out.float().cpu(), ref.float().cpu(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("preset, heads, dim, block_size, dtype, rope", RECONSTRUCT_CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_reconstruct_table_matches_codec_decode_both_layers(preset, heads, dim, block_size, dtype, rope,
                                                           device):
    cache = build_transform_cache(preset, heads, dim, block_size, lengths_for(block_size), seed=dim).to(device)
    ids, positions = table_block_ids(cache.block_table, cache.seq_lens, block_size)
    table = rope_cache(3 * block_size, dim, THETA, device) if rope else None
    previous_ref = previous_out = None
    for layer in range(2):
        params = cache.params(layer, device)
        assert params.cross_layer == (layer == 1 and PRESETS[preset].cross_layer)
        ref = reconstruct_transform_reference(cache.pages[layer], ids, cache.layouts[layer],
                                              previous_ref, table, positions, keep_code_frame=rope)
        out = reconstruct_transform_table(cache.pages[layer], cache.block_table, cache.seq_lens, params,
                                          previous_out, table, out_dtype=dtype, keep_code_frame=rope)
        rows = ids.numel() * block_size
        assert out[0].shape == (*cache.block_table.shape[:1], rows // cache.block_table.shape[0], heads, dim)
        assert out[0].dtype == dtype
        for got, want in zip(out, ref):
            close(got.reshape(rows, heads, dim), want, dtype)
        if params.cross_layer:  # the layer's prediction is in use: dropping it must change K
            no_pred = reconstruct_transform_reference(cache.pages[layer], ids, cache.layouts[layer],
                                                      tuple(torch.zeros_like(p) for p in previous_ref))
            assert (no_pred[1] - ref[1]).abs().max() > 0.1
        # hand the coding-frame reconstruction up (kernel: its own fp32 output, as a chain would)
        previous_ref = (ref[-1], ref[1])
        if dtype == torch.float32:
            previous_out = (out[-1], out[1])
        else:  # low-precision outputs: hand both sides the same fp32 input
            previous_out = tuple(p.reshape(out[0].shape).to(device).contiguous() for p in previous_ref)


def test_reconstruct_blocks_unused_entries_positions_and_precisions(device):
    """Block list API: -1 entries give zeros, RoPE per page position; tf32/bf16 tensor-core paths."""
    cache = build_transform_cache("seqkv-3", 2, 64, 16, [40], seed=7).to(device)
    layout, params = cache.layouts[0], cache.params(0, device)
    ids = torch.tensor([2, -1, 0, 1], dtype=torch.int32, device=device)
    positions = torch.tensor([900, 0, 16, 4000], device=device)
    table = rope_cache(4096, 64, THETA, device)
    ref_k, ref_v = reconstruct_transform_reference(cache.pages[0], ids, layout, None, table, positions)
    k, v = reconstruct_transform_blocks(cache.pages[0], ids, params, rope=table, block_positions=positions)
    close(k, ref_k, torch.float32)
    close(v, ref_v, torch.float32)
    assert not k[16:32].any() and not v[16:32].any()
    precisions = [("tf32", 5e-3), ("fp16", 2e-2)] + ([("bf16", 5e-2)] if ON_GPU else [])  # see PRECISIONS
    for precision, tol in precisions:
        k, v = reconstruct_transform_blocks(cache.pages[0], ids, params, precision=precision)
        scale = ref_v.abs().max().item()
        assert (v.cpu() - ref_v.cpu()).abs().max().item() < tol * scale, precision


def test_rope_cache_has_the_codec_rope_values():
    cos, sin = rope_tables(torch.arange(50), 32, THETA)
    table = rope_cache(50, 32, THETA)
    assert torch.equal(table[:, :16], cos[:, :16]) and torch.equal(table[:, 16:], sin[:, :16])
    assert torch.equal(cos[:, :16], cos[:, 16:])


# (preset, kv heads, head_dim, block size, key dtype)
WRITE_CASES = [
    ("seqkv-3", 2, 64, 16, torch.float32),
    ("seqkv-2", 3, 32, 128, torch.bfloat16),
    ("seqkv-4", 1, 128, 16, torch.float32),
    ("seqkv-2.5", 2, 128, 16, torch.float16),
    ("seqkv-f4", 3, 64, 16, torch.float32),
]


@pytest.mark.parametrize("preset, heads, dim, block_size, dtype", WRITE_CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_write_matches_codec_bytes(preset, heads, dim, block_size, dtype, device):
    """Bytes equal SlotLayout.encode's; the only tolerated differences are float32 rounding of
    z (or the prediction) across a decision threshold: then the code differs by one and the
    reference z lies within 1e-4 (relative) of that threshold (see kernels/write.py's docstring)."""
    def write(key, value, slot_mapping, pages, layout, previous):
        pages = pages.to(device)
        write_transform_slots(key.to(device), value.to(device), slot_mapping.to(device), pages,
                              transform_layer_params(layout, device),
                              None if previous is None else tuple(p.to(device) for p in previous))
        return pages

    check_layered_write(write, preset, heads, dim, block_size, dtype, tokens=37, num_blocks=3,
                        skipped=[3, 20], capture_seed=dim + 3)


def check_layered_write(write, preset, heads, dim, block_size, dtype, tokens, num_blocks, skipped,
                        capture_seed):
    """``tokens`` of a synthetic capture written into layers 0 and 1 (layer 1 predicted from the
    reference's reconstruction of layer 0) by ``write(key, value, slot_mapping, pages, layout,
    previous) -> pages`` on random page bytes (slot -1 at ``skipped``): untouched slots keep
    their bytes, written ones equal the reference's up to threshold flips (:func:`check_flips`)."""
    from tests.codec.synthetic import synthetic_capture

    layouts = transform_layouts(preset, heads, dim)
    gen = torch.Generator().manual_seed(dim)
    capture = synthetic_capture(2, heads, dim, tokens=tokens, seed=capture_seed)
    slot_mapping = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slot_mapping[list(skipped)] = -1  # padding
    previous = None
    for layer, layout in enumerate(layouts):
        params = transform_layer_params(layout)
        key = capture.keys[layer].to(dtype)
        value = capture.values[layer].to(dtype)
        expected = torch.randint(0, 256, (num_blocks, heads, block_size, layout.slot_bytes), dtype=torch.uint8,
                                 generator=gen)
        before = expected.clone()
        write_transform_reference(key, value, slot_mapping, expected, layout, previous)
        pages = write(key, value, slot_mapping, before, layout,
                      None if previous is None else tuple(p.contiguous() for p in previous)).cpu()
        written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
        written[slot_mapping[slot_mapping >= 0]] = True
        flat_got = pages.transpose(1, 2).reshape(-1, heads, layout.slot_bytes)
        flat_exp = expected.transpose(1, 2).reshape(-1, heads, layout.slot_bytes)
        assert torch.equal(flat_got[~written], flat_exp[~written])  # untouched slots
        if not torch.equal(pages, expected):
            check_flips(flat_got, flat_exp, slot_mapping, key, value, previous, layout, params)
        previous = layout.decode(layout.encode(key.float(), value.float(), previous), previous)


def check_flips(got, exp, slot_mapping, key, value, previous, layout, params):
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    for stream, x, codec in (("key", key, layout.key), ("value", value, layout.value)):
        a = stream_codes(got[slots], params, stream)
        b = stream_codes(exp[slots], params, stream)
        differ = a != b
        assert differ.float().mean().item() < 1e-3, f"{stream}: {int(differ.sum())} codes differ"
        assert ((a - b).abs()[differ] == 1).all()
        prev = None if previous is None else tuple(p[valid] for p in previous)
        residual = x[valid].float() - codec.prediction(x[valid].shape, prev)
        t = codec.inner.transform
        z = torch.einsum("thd,hde->the", residual - t.mean, t.basis)
        tables = getattr(params, stream)
        between = tables.cuts.cpu()[(tables.level_start.cpu() + torch.minimum(a, b)).long()]
        assert ((z - between).abs()[differ] <= 1e-4 * (1 + z.abs()[differ])).all()


def grid_layout(heads=2, dim=32, seed=0):
    """A transform layer whose every product and sum is exact in float32 (dyadic grid)."""
    gen = torch.Generator().manual_seed(seed)

    def stream(avg):
        def widths():  # [D] in 0..8 summing to avg * D, one 8-bit and one 0-bit component
            w = torch.full((dim,), avg)
            w[0], w[1], w[2] = 8, avg - (8 - avg) + (8 - avg) // 2, avg - (8 - avg) // 2
            for i in range(3, dim - 1, 2):
                d = int(torch.randint(-min(avg, 8 - avg), min(avg, 8 - avg) + 1, (1,), generator=gen))
                w[i], w[i + 1] = avg + d, avg - d
            return w[torch.randperm(dim, generator=gen)]

        bits = torch.stack([widths() for _ in range(heads)])
        assert int(bits.min()) >= 0 and int(bits.max()) == 8 and bool((bits.sum(-1) == avg * dim).all())
        levels = torch.zeros(heads, dim, 256)
        for h in range(heads):
            for c in range(dim):
                n = 1 << int(bits[h, c])
                levels[h, c, :n] = (torch.randperm(600, generator=gen)[:n].sort().values - 300).float() / 4
        basis = (torch.randint(-3, 4, (heads, dim, dim), generator=gen) / 8 + 2 * torch.eye(dim)).float()
        mean = torch.randint(-16, 17, (heads, dim), generator=gen).float() / 8
        weight = torch.randint(-2, 3, (2 * heads * dim, heads * dim), generator=gen).float() / 16
        bias = torch.randint(-8, 9, (heads * dim,), generator=gen).float() / 8
        transform = Transform.from_padded(mean, basis, bits, levels)
        return CrossLayerCodec(TransformCodec(transform), LinearPredictor(weight, bias))

    return SlotLayout(stream(3), stream(4), heads, dim)


def dyadic_write_case(tokens: int = 40, skipped=(), heads: int = 2, dim: int = 32):
    """A write whose every product and sum is exact in float32: ``(layout, key, value, previous,
    slot_mapping, before, expected)``; slot_mapping is -1 at ``skipped``, ``before`` random page
    bytes, ``expected`` the same pages after the reference's write."""
    layout = grid_layout(heads, dim)
    gen = torch.Generator().manual_seed(1)
    grid = lambda *s: torch.randint(-64, 65, s, generator=gen).float() / 16  # noqa: E731
    key, value = grid(tokens, heads, dim), grid(tokens, heads, dim)
    previous = (grid(tokens, heads, dim), grid(tokens, heads, dim))
    slot_mapping = torch.randperm(48, generator=gen)[:tokens]
    slot_mapping[list(skipped)] = -1
    before = torch.randint(0, 256, (3, heads, 16, layout.slot_bytes), dtype=torch.uint8, generator=gen)
    expected = before.clone()
    write_transform_reference(key, value, slot_mapping, expected, layout, previous)
    return layout, key, value, previous, slot_mapping, before, expected


def test_write_is_bit_exact_on_a_dyadic_grid(device):
    layout, key, value, previous, slot_mapping, before, expected = dyadic_write_case(skipped=[3])
    pages = before.to(device)
    write_transform_slots(key.to(device), value.to(device), slot_mapping.to(device), pages,
                          transform_layer_params(layout, device), tuple(p.to(device) for p in previous))
    assert torch.equal(pages.cpu(), expected)
    heads = key.shape[1]
    codes = stream_codes(expected.transpose(1, 2).reshape(-1, heads, layout.slot_bytes),
                         transform_layer_params(layout), "key")
    assert codes.max() > 128  # 8-bit components exercised (codes spanning two bytes)


def test_write_then_reconstruct_is_the_codec_roundtrip(device):
    """Kernel write + kernel read of a cross-layer layer == SlotLayout encode + decode."""
    layouts = transform_layouts("seqkv-3", 2, 64)
    cache = build_transform_cache("seqkv-3", 2, 64, 16, [16], seed=3)
    key, value = cache.tokens[1]
    previous = layouts[0].decode(layouts[0].encode(*cache.tokens[0]))
    params = transform_layer_params(layouts[1], device)
    pages = torch.zeros(1, 2, 16, layouts[1].slot_bytes, dtype=torch.uint8, device=device)
    prev = tuple(p.to(device).contiguous() for p in previous)
    write_transform_slots(key.to(device), value.to(device), torch.arange(16, device=device), pages, params, prev)
    k, v = reconstruct_transform_blocks(pages, torch.zeros(1, dtype=torch.int64, device=device), params, prev)
    k_ref, v_ref = layouts[1].decode(layouts[1].encode(key, value, previous), previous)
    close(k, k_ref, torch.float32)
    close(v, v_ref, torch.float32)


@pytest.mark.parametrize("preset, group, dtype, rope", [
    ("seqkv-3", 1, torch.float32, True),
    ("seqkv-2.5", 3, torch.bfloat16, True),
    ("seqkv-3-nox", 2, torch.float32, False),
], ids=lambda v: str(v).replace("torch.", ""))
def test_decode_attention_reconstruct_then_sdpa(preset, group, dtype, rope, device):
    heads, dim, block_size = 2, 32, 16
    cache = build_transform_cache(preset, heads, dim, block_size, [1, 17, 40], seed=group).to(device)
    gen = torch.Generator().manual_seed(group)
    batch = 3
    query = torch.randn(batch, heads * group, dim, generator=gen).to(device, dtype)
    own_k, own_v = (torch.randn(batch, heads, dim, generator=gen).to(device, dtype) for _ in range(2))
    table = rope_cache(64, dim, THETA, device) if rope else None
    params = cache.params(1, device)
    previous = None
    if params.cross_layer:
        previous = reconstruct_transform_table(cache.pages[0], cache.block_table, cache.seq_lens,
                                               cache.params(0, device))
    out = transform_decode_attention(query, own_k, own_v, cache.pages[1], cache.block_table, cache.seq_lens,
                                     params, dim ** -0.5, rope=table, previous=previous)
    ref = transform_decode_attention_reference(query.float(), own_k.float(), own_v.float(), cache.pages[1],
                                               cache.block_table.cpu(), cache.seq_lens.cpu(), cache.layouts[1],
                                               dim ** -0.5, rope=table, previous=previous)
    assert out.dtype == dtype and out.shape == query.shape
    atol, rtol = (2e-4, 2e-4) if dtype == torch.float32 else (3e-2, 3e-2)
    torch.testing.assert_close(out.float().cpu(), ref.float().cpu(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("choice", ["torch", "triton", "cuda"])
def test_public_api_dispatches_the_transform_format(choice, monkeypatch, device):
    monkeypatch.setenv("SEQKV_KERNELS", choice)
    cache = build_transform_cache("seqkv-3", 1, 32, 16, [5, 20], seed=2).to(device)
    params0, params1 = (kernels.layer_params(cache.layouts[i], device) for i in range(2))
    assert isinstance(params1, kernels.TransformLayerParams)
    ids = cache.block_table[1].to(device)
    k0, v0 = kernels.reconstruct_blocks(cache.pages[0], ids, params0)
    k1, v1 = kernels.reconstruct_blocks(cache.pages[1], ids, params1, previous=(k0, v0))
    ref0 = reconstruct_transform_reference(cache.pages[0], ids, cache.layouts[0])
    ref1 = reconstruct_transform_reference(cache.pages[1], ids, cache.layouts[1], ref0)
    close(k1, ref1[0], torch.float32)
    close(v1, ref1[1], torch.float32)
    pages, expected = cache.pages[1].clone(), cache.pages[1].clone()
    prev = (k0[:2].contiguous(), v0[:2].contiguous())
    new_k, new_v = (cache.tokens[1][i][:2].to(device) for i in range(2))
    slots = torch.tensor([0, -1], device=device)
    kernels.write_slots(new_k, new_v, slots, pages, params1, previous=prev)
    write_transform_reference(new_k, new_v, slots, expected, cache.layouts[1], prev)
    assert (pages != expected).float().mean().item() < (1e-3 if ON_GPU else 1e-12)
    with pytest.raises(KernelArgumentError, match="pass previous"):
        kernels.write_slots(new_k, new_v, slots, pages, params1)


def test_rotation_params_refuse_transform_arguments(device):
    from tests.kernels.helpers import build_cache

    cache = build_cache([3], heads=1, dim=32, block_size=16, device=device)
    with pytest.raises(KernelArgumentError, match="transform format only"):
        kernels.reconstruct_blocks(cache.pages, cache.block_table[0], cache.params, rope=rope_cache(4, 32, THETA))
    assert isinstance(kernels.layer_params(cache.layout), kernels.LayerKernelParams)


def test_bad_arguments_are_clear_errors(device):
    cache = build_transform_cache("seqkv-3", 2, 32, 16, [20], seed=4).to(device)
    params = cache.params(1, device)
    pages, ids = cache.pages[1], cache.block_table[0]
    prev = tuple(torch.zeros(32, 2, 32, device=device) for _ in range(2))
    with pytest.raises(KernelArgumentError, match="pass previous"):
        reconstruct_transform_blocks(pages, ids, params)
    with pytest.raises(KernelArgumentError, match="previous key: expected shape"):
        reconstruct_transform_blocks(pages, ids, params, (prev[0][:16], prev[1]))
    with pytest.raises(KernelArgumentError, match="pages: expected shape"):
        reconstruct_transform_blocks(pages[:, :1], ids, params, prev)
    with pytest.raises(KernelArgumentError, match="block size >= 16"):
        reconstruct_transform_blocks(pages[:, :, :8], ids, params, prev)
    with pytest.raises(KernelArgumentError, match="rope needs block_positions"):
        reconstruct_transform_blocks(pages, ids, params, prev, rope=rope_cache(64, 32, THETA, device))
    with pytest.raises(KernelArgumentError, match="precision"):
        reconstruct_transform_blocks(pages, ids, params, prev, precision="fp8")
    key = torch.zeros(3, 2, 32, device=device)
    with pytest.raises(KernelArgumentError, match="slot_mapping: expected dtype"):
        write_transform_slots(key, key, torch.zeros(3, device=device), pages, params, prev)
    with pytest.raises(KernelArgumentError, match="value: expected shape"):
        write_transform_slots(key, key[:2], torch.zeros(3, dtype=torch.long, device=device), pages, params)
