import math

import pytest
import torch

from vllm_seqkv.codec import codec_names, make_codec
from vllm_seqkv.codec.base import CodecInputError
from vllm_seqkv.codec.baselines import BASELINES, lloyd_max_codebook
from tests.codec.synthetic import encode, synthetic_calibration

HEADS, DIM, TOKENS, LAYERS = 3, 64, 64, 2

# Relative MSE on i.i.d. Gaussian data: (upper bound, lower bound). Upper bounds come from the
# papers' figures (TurboQuant Table 1: 0.009 / 0.03 / 0.117 at 4 / 3 / 2 bits) or the
# quantizer's step; lower bounds catch a codec that silently stores more than it claims.
REL_MSE_BOUNDS = {
    "bf16": (1e-5, 0.0),
    "fp8-e4m3": (2e-3, 1e-4),
    "int8-token": (1e-4, 5e-6),
    "int4-token": (0.02, 5e-3),
    "kivi-4": (0.01, 2e-3),
    "kivi-2": (0.25, 0.08),
    "turbo-4": (0.0105, 0.007),
    "turbo-3": (0.037, 0.025),
    "turbo-2.5": (0.085, 0.05),
    "turbo-2": (0.125, 0.10),
}


def build(name, dim=DIM):
    from vllm_seqkv.codec import needs_calibration

    if needs_calibration(name):
        return make_codec(name, synthetic_calibration(name, LAYERS, HEADS, dim))
    return make_codec(name)


def stream_codecs(name):
    codec = build(name)
    for layer in range(LAYERS):
        key, value = codec.codecs_for_layer(layer)
        yield f"{name}/L{layer}/K", key
        yield f"{name}/L{layer}/V", value


def gaussian(tokens=TOKENS, heads=HEADS, dim=DIM, seed=0):
    return torch.randn(tokens, heads, dim, generator=torch.Generator().manual_seed(seed))


def test_every_baseline_has_bounds():
    assert set(REL_MSE_BOUNDS) == set(BASELINES)


@pytest.mark.parametrize("name", list(REL_MSE_BOUNDS))
def test_roundtrip_error_within_paper_bounds(name):
    codec = make_codec(name)
    x = gaussian(tokens=256)
    upper, lower = REL_MSE_BOUNDS[name]
    for stream in (codec.key, codec.value):
        err = ((stream.roundtrip(x) - x) ** 2).sum() / (x**2).sum()
        assert lower <= err <= upper, f"{name}: relative MSE {err:.5f} not in [{lower}, {upper}]"


@pytest.mark.parametrize("name", codec_names())
@pytest.mark.parametrize("dim", [32, 64])
def test_bits_per_element_equals_packed_bytes(name, dim):
    codec = build(name, dim)
    x = gaussian(dim=dim)
    for layer in range(LAYERS):
        for stream in codec.codecs_for_layer(layer):
            packed = encode(stream, x)
            assert 8 * packed.nbytes / x.numel() == pytest.approx(stream.bits_per_element(HEADS, dim), abs=1e-12)


@pytest.mark.parametrize("name", codec_names())
def test_same_input_gives_same_bytes(name):
    x = gaussian(seed=5)
    for label, stream in stream_codecs(name):
        assert encode(stream, x.clone()).to_bytes() == encode(stream, x.clone()).to_bytes(), label


@pytest.mark.parametrize("name", codec_names())
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_is_refused(name, bad):
    x = gaussian()
    x[3, 1, 7] = bad
    for label, stream in stream_codecs(name):
        with pytest.raises(CodecInputError):
            encode(stream, x)


def test_block_codecs_refuse_partial_blocks():
    with pytest.raises(CodecInputError, match="multiple of block_size"):
        make_codec("kivi-2").key.encode(gaussian(tokens=40))


def test_scales_follow_each_token():
    # per-token codecs must not let one loud token crush the others' precision
    x = gaussian()
    x[0] *= 1000
    for name in ("int8-token", "int4-token", "turbo-3"):
        stream = make_codec(name).key
        rest = ((stream.roundtrip(x)[1:] - x[1:]) ** 2).sum() / (x[1:] ** 2).sum()
        assert rest < REL_MSE_BOUNDS[name][0], name


@pytest.mark.parametrize("bits, gaussian_centers", [(1, [0.7979]), (2, [0.4528, 1.5104])])
def test_lloyd_max_matches_gaussian_tables_in_high_dimension(bits, gaussian_centers):
    dim = 1024  # a coordinate of a random unit vector is ~N(0, 1/dim)
    book = lloyd_max_codebook(dim, bits) * math.sqrt(dim)
    positive = book[book > 0].tolist()
    assert positive == pytest.approx(gaussian_centers, rel=5e-3)
    assert torch.allclose(book, -book.flip(0), atol=1e-6)


def test_kivi_keeps_the_recent_window_exact():
    codec = make_codec("kivi-2")
    assert codec.exact_recent == 32 and codec.key.block_size == 32
    assert codec.bits_per_element(HEADS, DIM, context=1024) == pytest.approx((3 * 992 + 16 * 32) / 1024)
