import math

import pytest
import torch

import seqkv_fixtures as fixtures
from benchmarks import predictors as P
from benchmarks.entropy import EntropySettings, channel_entropy, entropy_markdown, measure

SHAPE = (2, 64, 3, 2, 8)  # windows, positions, layers, kv heads, head_dim


def test_channel_entropy_of_known_distributions():
    symbols = torch.stack([torch.arange(400) % 4, torch.zeros(400, dtype=torch.long),
                           torch.tensor([0, 1] * 200) * 7 - 3], dim=1)
    assert channel_entropy(symbols).tolist() == pytest.approx([2.0, 0.0, 1.0])


def test_dpcm_is_closed_loop_and_free_on_a_constant_stream():
    step = torch.full(SHAPE[2:], 0.1)
    x = torch.randn(SHAPE[0], 1, *SHAPE[2:]).expand(SHAPE).contiguous()
    res = P.previous_token(x, step)
    assert (res.symbols[:, 1:] == 0).all()
    assert (res.reconstruction - x).abs().max() <= 0.05 + 1e-6
    noisy = x + torch.randn(SHAPE)
    assert (P.previous_token(noisy, step).reconstruction - noisy).abs().max() <= 0.05 + 1e-6  # no drift


def test_block_anchor_pays_anchors_as_side_bits():
    x = torch.randn(SHAPE)
    res = P.block_anchor(x, torch.full(SHAPE[2:], 0.1), block=16)
    assert res.side_bits_per_element == pytest.approx((8 + 16 / SHAPE[-1]) / 16)
    assert not res.paid[:, ::16].any() and res.paid[:, 1:16].all()
    assert (res.reconstruction - x).abs().max() < 0.06


def test_cross_layer_learns_a_linear_chain():
    gen = torch.Generator().manual_seed(0)
    maps = [torch.randn(16, 16, generator=gen) / 4 + torch.eye(16) for _ in range(SHAPE[2])]

    def chain(n):
        layers = [torch.randn(n, 16, generator=gen)]
        for m in maps[1:]:
            layers.append(layers[-1] @ m + 0.3)
        return torch.stack(layers, 1)  # [n, L, 16]

    step = torch.full(SHAPE[2:], 0.05)
    calib = chain(2000)
    fitted = P.fit_cross_layer(calib, calib)
    x = chain(SHAPE[0] * SHAPE[1]).view(SHAPE)
    res = P.cross_layer(x, step, fitted)
    later = res.residual[:, :, 1:].pow(2).mean() / x[:, :, 1:].var()
    assert later < 0.01
    assert (res.reconstruction - x).abs().max() <= 0.025 + 1e-5


@pytest.fixture(scope="module")
def tiny_result(tiny_model_dir):
    settings = EntropySettings(model_dir=tiny_model_dir, text=fixtures.corpus_path("test"),
                               calib_text=fixtures.corpus_path("train"), context=64, tokens=256,
                               calib_tokens=512, command="pytest")
    return measure(settings)


def test_layer0_is_a_function_of_the_token_id(tiny_result):
    check = tiny_result["layer0_token_check"]
    assert check["repeated_token_pairs"] > 10
    assert check["K pre-RoPE layer 0"] == 0.0 and check["V layer 0"] == 0.0
    assert check["K pre-RoPE layer 1"] > 0.0 and check["K post-RoPE layer 0"] > 0.0


def test_entropy_report_compares_with_the_token_entropy(tiny_result):
    ce = tiny_result["cross_entropy_bits_per_token"]
    assert 1.0 < ce < math.log2(4096)
    totals = tiny_result["totals_bits_per_token_position"]
    assert set(totals) >= {"none (raw)", "previous token (closed-loop DPCM)", "cross-layer linear (l-1 -> l)"}
    token = totals["token id -> layer 0, cross-layer above"]["K pre-RoPE"]
    assert token < totals["cross-layer linear (l-1 -> l)"]["K pre-RoPE"]  # layer 0 costs nothing
    for row in tiny_result["predictors"]:
        assert len(row["bits_per_element_per_layer"]) == 4
        if row["predictor"] == "none (raw)":  # a 3-bit step over the calibration range: ~8 symbols
            assert 0.5 < row["bits_per_element"] < 3.3
    text = entropy_markdown(tiny_result)
    assert "What holds and what does not" in text and f"{ce:.2f} bits" in text
