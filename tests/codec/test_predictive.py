import pytest
import torch

from vllm_seqkv.codec import make_codec
from vllm_seqkv.codec.base import CodecInputError, SlotLayout
from vllm_seqkv.codec.baselines import TurboCodec
from vllm_seqkv.codec.calibration import Calibration, CalibrationError, ChannelMoments
from vllm_seqkv.codec.predictive import ChannelPredictor, PredictiveCodec


def offset_stream(tokens=64, heads=3, dim=64, seed=0):
    """Keys with a large fixed per-channel offset, as SmolLM2's keys have."""
    gen = torch.Generator().manual_seed(seed)
    offset = torch.randn(heads, dim, generator=gen) * 4
    return offset + torch.randn(tokens, heads, dim, generator=gen), offset


def rel_mse(x, y):
    return ((x - y) ** 2).mean().item() / (x**2).mean().item()


def test_predictor_removes_the_offset_before_coding():
    x, offset = offset_stream()
    plain = TurboCodec((3, 3))
    predicted = PredictiveCodec(TurboCodec((3, 3)), ChannelPredictor(offset, torch.ones_like(offset)))
    assert rel_mse(x, predicted.roundtrip(x)) < rel_mse(x, plain.roundtrip(x)) / 3
    assert predicted.bits_per_element(3, 64) == plain.bits_per_element(3, 64)


def test_weights_move_error_to_insensitive_channels():
    x, offset = offset_stream(tokens=256)
    weight = torch.ones(3, 64)
    weight[:, :8] = 4.0
    codec = PredictiveCodec(TurboCodec((3, 3)), ChannelPredictor(offset, weight))
    err = (x - codec.roundtrip(x)) ** 2
    assert err[..., :8].mean() < err[..., 8:].mean() / 4


def test_wrong_head_count_is_a_clear_error():
    codec = PredictiveCodec(TurboCodec((3, 3)), ChannelPredictor.identity(2, 64))
    with pytest.raises(CodecInputError, match="calibrated for"):
        codec.encode(torch.randn(4, 3, 64))


@pytest.mark.parametrize("dim", [32, 64, 128])
@pytest.mark.parametrize("split", [((4, 3), (2, 2)), ((4, 4), (4, 3))])
def test_slot_layout_roundtrip_equals_codec_roundtrip(dim, split):
    key, value = TurboCodec(split[0]), TurboCodec(split[1])
    layout = SlotLayout(key, value, num_kv_heads=3, head_dim=dim)
    k, v = torch.randn(5, 3, dim), torch.randn(5, 3, dim)
    slots = layout.encode(k, v)
    assert slots.dtype == torch.uint8 and slots.shape == (5, 3, layout.slot_bytes)
    k_hat, v_hat = layout.decode(slots)
    torch.testing.assert_close(k_hat, key.roundtrip(k))
    torch.testing.assert_close(v_hat, value.roundtrip(v))
    # a slot is independent of its neighbours: decoding one token alone gives the same
    torch.testing.assert_close(layout.decode(slots[2:3])[0], k_hat[2:3])
    bits = 8 * layout.slot_bytes / (2 * dim)
    expected = (key.bits_per_element(3, dim) + value.bits_per_element(3, dim)) / 2
    assert bits == pytest.approx(expected)


def make_calibration(layers=2, heads=3, dim=64):
    moments = ChannelMoments.zeros(layers, heads, dim)
    for layer in range(layers):
        moments.add(layer, offset_stream(32, heads, dim, seed=layer)[0])
    sens = torch.rand(layers, heads, dim) + 0.1
    return Calibration.fit("test", moments, moments, sens, sens)


def test_calibration_save_load_and_corruption(tmp_path):
    cal = make_calibration()
    path = tmp_path / "cal.safetensors"
    cal.save(path)
    loaded = Calibration.load(path)
    torch.testing.assert_close(loaded.k_weight, cal.k_weight)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CalibrationError, match="checksum|unreadable"):
        Calibration.load(path)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(CalibrationError, match="unreadable"):
        Calibration.load(path)
    with pytest.raises(CalibrationError, match="does not exist"):
        Calibration.load(tmp_path / "missing.safetensors")


def test_presets_need_calibration_and_use_it_per_layer():
    with pytest.raises(ValueError, match="calibrate"):
        make_codec("seqkv-3-rot")
    cal = make_calibration()
    codec = make_codec("seqkv-3-rot", cal)
    k0, _ = codec.codecs_for_layer(0)
    k1, _ = codec.codecs_for_layer(1)
    assert not torch.equal(k0.predictor.mean, k1.predictor.mean)
    assert make_codec("seqkv-3-rot-none").bits_per_element(3, 64, 2048) < make_codec(
        "seqkv-3-rot", cal).bits_per_element(3, 64, 2048)
    assert codec.pre_rope_keys and codec.sink_tokens == 1
