import pytest
import torch

from vllm_seqkv.codec import make_codec
from vllm_seqkv.codec.base import CodecInputError, SlotLayout
from vllm_seqkv.codec.calibration import CalibrationError, TransformCalibration
from vllm_seqkv.codec.crosslayer import CrossLayerCodec, LinearPredictor
from vllm_seqkv.codec.transform import (
    MAX_BITS,
    Transform,
    TransformCodec,
    allocate_bits,
    fit_transform,
    lloyd_max,
)
from tests.codec.synthetic import synthetic_calibration, synthetic_capture


def correlated(tokens=512, heads=2, dim=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=gen)
    scales = torch.logspace(1, -2, dim)
    return (torch.randn(tokens, heads, dim, generator=gen) * scales) @ mix + 3.0


def fitted(x, bits=3.0):
    eye = torch.eye(x.shape[-1]).expand(x.shape[1], -1, -1)
    return TransformCodec(fit_transform(x, eye, bits))


@pytest.mark.parametrize("bits, centers", [(1, [0.7979]), (2, [0.4528, 1.5104])])
def test_lloyd_max_on_gaussian_samples_matches_tables(bits, centers):
    x = torch.randn(1, 200_000, generator=torch.Generator().manual_seed(0))
    levels, mse = lloyd_max(x, bits)
    positive = levels[0][levels[0] > 0].tolist()
    assert positive == pytest.approx(centers, rel=0.02)
    assert float(mse[0]) == pytest.approx({1: 0.3634, 2: 0.1175}[bits], rel=0.03)


def test_water_filling_spends_bits_where_variance_is():
    variance = torch.tensor([100.0, 10.0, 1.0, 0.001])
    distortion = variance[:, None] * torch.tensor([4.0 ** -b for b in range(MAX_BITS + 1)])
    bits = allocate_bits(distortion.double(), 8)
    assert int(bits.sum()) == 8
    assert bits.tolist() == sorted(bits.tolist(), reverse=True)
    assert bits[-1] == 0 and bits[0] >= 3
    with pytest.raises(CodecInputError, match="exceed"):
        allocate_bits(distortion.double(), 4 * MAX_BITS + 1)


def test_transform_beats_plain_quantization_of_correlated_data():
    x = correlated()
    codec = fitted(x)
    err = ((codec.roundtrip(x) - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert err < 0.02
    assert codec.bits_per_element(2, 32) == 3.0


@pytest.mark.parametrize("dim, bits", [(32, 2.5), (64, 3.0), (128, 2.0)])
def test_packed_bytes_equal_claimed_bits_and_slots_are_independent(dim, bits):
    x = correlated(dim=dim)
    codec = fitted(x, bits)
    packed = codec.encode(x[:17])
    assert 8 * packed.nbytes / x[:17].numel() == codec.bits_per_element(2, dim)
    layout = SlotLayout(codec, codec, 2, dim)
    slots = layout.encode(x[:17], x[:17])
    torch.testing.assert_close(layout.decode(slots[5:6])[0], layout.decode(slots)[0][5:6])
    assert codec.encode(x[:17].clone()).to_bytes() == packed.to_bytes()


def bit_plane_stream(codec, codes):
    """The slot layout as defined (what the kernels read): bit ``j`` of component
    ``plane_component[h, k]``'s code at stream position ``k`` (``j = plane_index[h, k]``),
    stream bit ``k`` = bit ``k % 8`` of byte ``k // 8``."""
    tokens = codes.shape[0]
    bits = (codes.long().gather(-1, codec.plane_component.expand(tokens, -1, -1)) >> codec.plane_index) & 1
    weights = 1 << torch.arange(8)
    return (bits.reshape(*bits.shape[:-1], -1, 8) * weights).sum(-1).to(torch.uint8)


@pytest.mark.parametrize("dim, bits", [(32, 2.5), (64, 3.0), (128, 2.0)])
def test_codes_are_packed_as_the_bit_plane_layout_defines(dim, bits):
    codec = fitted(correlated(dim=dim), bits)
    gen = torch.Generator().manual_seed(1)
    mask = (1 << codec.transform.bits) - 1
    codes = torch.randint(0, 256, (19, 2, dim), generator=gen) & mask
    packed = codec._pack_fields(codes.to(torch.int32))
    assert torch.equal(packed, bit_plane_stream(codec, codes))
    assert torch.equal(codec._unpack_fields(packed), codes.to(torch.int32))
    noise = torch.randint(0, 256, packed.shape, generator=gen, dtype=torch.uint8)  # any bytes decode
    assert torch.equal(bit_plane_stream(codec, codec._unpack_fields(noise)), noise)


def thresholds_by_width(codec):
    """``[(components [C] into H * D, cuts [C, 2**bits - 1])]`` per width, from the levels by the
    codec's formula (the midpoints of adjacent levels), independent of its ``cuts`` tensor."""
    t = codec.transform
    out = []
    for b in range(1, 9):
        mask = t.bits == b
        if bool(mask.any()):
            lv = t.padded_levels()[mask][:, : 1 << b]
            out.append((mask.reshape(-1).nonzero().flatten(), ((lv[:, 1:] + lv[:, :-1]) / 2).contiguous()))
    return out


@pytest.mark.parametrize("dim, bits", [(32, 2.5), (64, 3.0), (128, 2.0)])
def test_a_code_counts_the_thresholds_below_its_value_at_every_width(dim, bits):
    codec = fitted(correlated(dim=dim), bits)
    widths = {int(codec.transform.bits.reshape(-1)[c[0]]) for c, _ in thresholds_by_width(codec)}
    assert min(widths) <= 3 < max(widths)  # both ways of quantizing are exercised
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(23, 2, dim, generator=gen) * 3
    flat = z.view(23, -1)
    for components, cuts in thresholds_by_width(codec):  # some values exactly at a threshold
        picks = torch.randint(0, cuts.shape[1], (components.numel(),), generator=gen)
        flat[:5, components] = cuts.gather(1, picks[:, None]).T
    codes = codec._quantize(z).view(23, -1)
    for components, cuts in thresholds_by_width(codec):
        expected = torch.searchsorted(cuts, flat[:, components].T.contiguous()).T
        assert torch.equal(codes[:, components].long(), expected)
        assert torch.equal(expected, (flat[:, components, None] > cuts).sum(-1))


def test_one_copy_of_thresholds_and_inverse_is_what_codec_and_kernels_read():
    """The codec keeps its thresholds packed like its levels (each component's ``2**bits - 1``
    cuts, then +inf) and its inverse row-major; the kernels' params view them (no second copy)."""
    from vllm_seqkv.kernels.params import transform_layer_params

    codec = fitted(correlated(dim=64), 3.0)
    starts = codec.level_start.reshape(-1).long()
    assert codec.cuts.shape == codec.transform.levels.shape
    for components, compact in thresholds_by_width(codec):
        width = compact.shape[1]
        assert torch.equal(codec.cuts[starts[components, None] + torch.arange(width)], compact)
        assert bool(torch.isinf(codec.cuts[starts[components] + width]).all())
    zero_bit = (codec.transform.bits.reshape(-1) == 0).nonzero().flatten()
    assert zero_bit.numel() and bool(torch.isinf(codec.cuts[starts[zero_bit]]).all())
    assert codec._inverse.is_contiguous()
    inverse_as_fitted = torch.linalg.inv(codec.transform.basis.double()).float()  # column-major
    for tokens in (1, 2, 9):  # decode multiplies as before: bit-equal (one token too: a gemv)
        packed = codec.encode(correlated(tokens=tokens, dim=64, seed=tokens))
        codes = codec._unpack_fields(packed.fields["codes"].reshape(tokens, 2, -1))
        z = codec.transform.padded_levels().view(-1, 256)[torch.arange(128).view(2, 64), codes.long()]
        before = torch.baddbmm(codec.transform.mean[:, None, :], z.transpose(0, 1), inverse_as_fitted)
        assert torch.equal(codec.decode(packed), before.transpose(0, 1))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # as while vLLM builds a bf16 model
    try:
        assert TransformCodec(codec.transform).cuts.dtype == torch.float32
    finally:
        torch.set_default_dtype(default)
    params = transform_layer_params(SlotLayout(codec, codec, 2, 64))
    for stream in (params.key, params.value):
        assert stream.cuts.data_ptr() == codec.cuts.data_ptr()
        assert stream.levels.data_ptr() == codec.transform.levels.data_ptr()
        assert stream.level_start.data_ptr() == codec.level_start.data_ptr()
        assert stream.inverse.data_ptr() == codec._inverse.data_ptr()
        assert stream.start.data_ptr() == codec.field_offset.data_ptr()
        assert stream.nbits.data_ptr() == codec.field_bits.data_ptr()


def test_transform_refuses_bad_input():
    x = correlated()
    codec = fitted(x)
    bad = x.clone()
    bad[1, 0, 0] = float("nan")
    with pytest.raises(CodecInputError, match="NaN"):
        codec.encode(bad)
    with pytest.raises(CodecInputError, match="fitted for"):
        codec.encode(torch.randn(4, 3, 32))
    t = codec.transform
    with pytest.raises(CodecInputError, match="whole number of bytes"):
        odd = t.bits.clone()
        odd[0, 0] += -1 if odd[0, 0] > 0 else 1
        Transform.from_padded(t.mean, t.basis, odd, t.padded_levels())
    with pytest.raises(CodecInputError, match="packed levels hold"):
        Transform(t.mean, t.basis, t.bits, t.levels[:-1])
    with pytest.raises(CodecInputError, match="0..8 bits"):
        Transform.from_padded(t.mean, t.basis, t.bits + 9, t.padded_levels())


def test_packed_levels_hold_exactly_the_used_entries_in_component_order():
    t = fitted(correlated(dim=64), 3.0).transform
    padded = t.padded_levels()
    sizes = 1 << t.bits.long()
    assert t.levels.numel() == int(sizes.sum()) < padded.numel() // 4
    start = t.level_start.long()
    for h, c in [(0, 0), (0, 63), (1, 5), (1, 63)]:
        n = int(sizes[h, c])
        assert torch.equal(t.levels[start[h, c]: start[h, c] + n], padded[h, c, :n])
        assert bool((padded[h, c, n:] == 0).all())
    assert torch.equal(Transform.from_padded(t.mean, t.basis, t.bits, padded).levels, t.levels)


def test_cross_layer_prediction_codes_less_error_at_equal_bits():
    below = correlated(seed=1)
    above = 0.9 * below + 0.1 * correlated(seed=2)
    previous = (below, below * 0.0)
    predictor = LinearPredictor.fit(previous, above)
    residual = above - predictor.predict(previous, 2, 32)
    crossed = CrossLayerCodec(fitted(residual, 2.0), predictor)
    alone = CrossLayerCodec(fitted(above, 2.0), None)
    assert crossed.takes_previous and not alone.takes_previous
    err_crossed = ((crossed.decode(crossed.encode(above, previous), previous) - above) ** 2).sum()
    err_alone = ((alone.decode(alone.encode(above)) - above) ** 2).sum()
    assert err_crossed < 0.5 * err_alone
    with pytest.raises(CodecInputError, match="previous="):
        crossed.encode(above)


def test_predictor_is_zero_when_the_layer_below_says_nothing():
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(400, 2, 8, generator=gen)
    predictor = LinearPredictor.fit((noise, noise), torch.randn(400, 2, 8, generator=gen))
    assert not predictor.weight.any()


def test_preset_calibration_save_load_and_corruption(tmp_path):
    cal = synthetic_calibration("seqkv-3")
    path = tmp_path / "cal.safetensors"
    cal.save(path)
    loaded = TransformCalibration.load(path, "seqkv-3")
    assert loaded.cross_layer and loaded.num_layers == 2
    torch.testing.assert_close(loaded.tensors["k.basis"], cal.tensors["k.basis"])
    with pytest.raises(CalibrationError, match="fitted for preset"):
        TransformCalibration.load(path, "seqkv-4")
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CalibrationError, match="checksum|unreadable"):
        TransformCalibration.load(path)
    with pytest.raises(ValueError, match="--preset seqkv-3"):
        make_codec("seqkv-3", synthetic_calibration("seqkv-4"))


def test_closed_loop_layers_decode_in_order_through_slots():
    capture = synthetic_capture()
    codec = make_codec("seqkv-3", synthetic_calibration("seqkv-3"))
    assert codec.cross_layer and codec.pre_rope_keys
    previous, errors = None, []
    for layer in range(2):
        layout = SlotLayout(*codec.codecs_for_layer(layer), 3, 64)
        k, v = capture.keys[layer][:40], capture.values[layer][:40]
        slots = layout.encode(k, v, previous)
        assert slots.shape == (40, 3, layout.slot_bytes) and layout.slot_bytes == 3 * 64 * 2 // 8
        previous = layout.decode(slots, previous)
        errors.append(float(((previous[0] - k) ** 2).sum() / ((k - k.mean(0)) ** 2).sum()))
    assert max(errors) < 0.1
