"""Layer 0 from the token id: the table codec, its verification, and presets that use it."""

import pytest
import torch

from tests.codec.synthetic import synthetic_capture
from vllm_seqkv.codec import make_codec
from vllm_seqkv.codec.base import CodecInputError, SlotLayout
from vllm_seqkv.codec.calibration import TransformCalibration
from vllm_seqkv.codec.presets import PRESETS
from vllm_seqkv.codec.token_table import TokenTableCodec, verify


def table(vocab=50, heads=3, dim=64, seed=0):
    return torch.randn(vocab, heads, dim, generator=torch.Generator().manual_seed(seed)) * 4


@pytest.mark.parametrize("heads,dim", [(1, 32), (3, 64), (2, 128)])
def test_rows_with_rounding_noise_decode_to_their_rows(heads, dim):
    rows = table(heads=heads, dim=dim)
    codec = TokenTableCodec(rows.to(torch.bfloat16))
    ids = torch.randint(0, rows.shape[0], (37,))
    x = rows[ids] * (1 + 0.005 * torch.randn(37, heads, dim))  # bf16-like noise
    packed = codec.encode(x)
    assert torch.equal(packed.fields["ids"][..., 0].long(), ids[:, None].expand(37, heads))
    assert torch.equal(codec.decode(packed), rows.to(torch.bfloat16)[ids].float())
    assert packed.nbytes * 8 == codec.bits_per_element(heads, dim) * x.numel()


def test_input_that_is_no_table_row_is_refused():
    codec = TokenTableCodec(table())
    with pytest.raises(CodecInputError, match="match no vocabulary row"):
        codec.encode(torch.randn(4, 3, 64) * 4)
    with pytest.raises(CodecInputError, match="token table is for"):
        codec.encode(torch.randn(4, 2, 64))


def test_verification_refuses_a_layer_0_that_depends_on_position():
    rows = (table(), table(seed=1))
    ids = torch.randint(0, 50, (200,))
    ok, message = verify(rows, ids, rows[0][ids], rows[1][ids], 1e-3)
    assert ok and "verified" in message
    positional = rows[0][ids] + 0.1 * torch.arange(200.0)[:, None, None]
    ok, message = verify(rows, ids, positional, rows[1][ids], 1e-3)
    assert not ok and "refused" in message


def test_preset_codes_layer_0_by_table_and_predicts_layer_1_from_it(tmp_path):
    capture = synthetic_capture(layers=3, vocab=40)
    calibration = PRESETS["seqkv-3"].fit(capture)
    path = tmp_path / "cal.safetensors"
    calibration.save(path)
    loaded = TransformCalibration.load(path, "seqkv-3")
    assert loaded.layer0_tokens and loaded.layer0_check == "synthetic table"
    codec = make_codec("seqkv-3", loaded)
    assert isinstance(codec.per_layer[0][0], TokenTableCodec)
    # pages are uniform: every layer is counted at the largest layer's slot
    coded = [codec.coded_bits_per_element(layer, 3, 64) for layer in range(3)]
    assert coded[0] == 0.5 and coded[1] == coded[2] == 3.0
    assert codec.bits_per_element(3, 64, 10_000, num_layers=3) == pytest.approx(3.0, abs=0.01)
    # decode layer by layer through the slots, as the vLLM backend does
    layouts = [SlotLayout(*codec.per_layer[layer], 3, 64) for layer in range(3)]
    assert layouts[0].slot_bytes < layouts[1].slot_bytes
    previous = None
    for layer, layout in enumerate(layouts):
        k, v = capture.keys[layer][:64], capture.values[layer][:64]
        slots = layout.encode(k, v, previous)
        previous = layout.decode(slots, previous)
        if layer == 0:
            assert torch.allclose(previous[0], k, rtol=1e-2, atol=1e-2)
    without = PRESETS["seqkv-3"].fit(synthetic_capture(layers=3))  # no table: layer 0 coded
    assert not without.layer0_tokens


def test_calibration_without_the_table_tensors_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from vllm_seqkv.codec.calibration import CalibrationError, save_checked

    path = tmp_path / "cal.safetensors"
    PRESETS["seqkv-3"].fit(synthetic_capture(vocab=20)).save(path)
    tensors = load_file(str(path))
    del tensors["l0.k"]
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_checked(path, tensors, meta["format"], {k: v for k, v in meta.items()
                                                 if k not in ("format", "sha256")})
    with pytest.raises(CalibrationError, match="missing tensors"):
        TransformCalibration.load(path, "seqkv-3")


def test_heads_that_do_not_fit_the_first_heads_row_are_searched_on_their_own():
    rows = table()
    rows[5, 0] = rows[3, 0]  # two tokens alike in head 0 only
    codec = TokenTableCodec(rows)
    x = torch.stack([rows[5], rows[3]])
    assert torch.equal(codec.decode(codec.encode(x)), x)


def full_search_ids(rows: torch.Tensor, x: torch.Tensor, tolerance: float) -> torch.Tensor:
    """The search as it was with a float32 copy of every head ``[H, vocab, D]``: head 0 against
    its copy, a head that misfits its token's row against its own (the ids to keep)."""
    search = rows.float().transpose(0, 1).contiguous()
    norms = search.pow(2).sum(-1)
    ids = TokenTableCodec._nearest(x[:, :1], search[:1], norms[:1]).expand(-1, x.shape[1]).clone()
    heads = torch.arange(x.shape[1])
    picked = search.transpose(0, 1)[ids, heads]
    error = (x - picked).norm(dim=-1) / picked.norm(dim=-1).clamp_min(1e-6)
    for h in (error > tolerance).any(0).nonzero().flatten().tolist():
        ids[:, h] = TokenTableCodec._nearest(x[:, h:h + 1], search[h:h + 1], norms[h:h + 1])[:, 0]
    return ids


@pytest.mark.parametrize("heads, dim", [(1, 32), (3, 64), (4, 128)])
def test_search_keeps_one_heads_float32_copy_and_finds_the_same_ids(heads, dim):
    gen = torch.Generator().manual_seed(heads)
    rows = (torch.randn(3000, heads, dim, generator=gen) * 3).to(torch.bfloat16)
    rows[7, 0] = rows[11, 0]  # alike in head 0 only: head 1 and on are searched on their own
    rows[100:110, 0] = rows[200:210, 0]
    codec = TokenTableCodec(rows)
    ids = torch.randint(0, 3000, (300,), generator=gen)
    ids[:6] = torch.tensor([7, 11, 100, 205, 109, 3])
    x = rows[ids].float() * (1 + 0.004 * torch.randn(300, heads, dim, generator=gen))  # bf16-like noise
    found = codec.match(x)
    assert torch.equal(found, full_search_ids(rows, x, codec.tolerance))
    assert tuple(codec._search.shape) == (1, 3000, dim) and tuple(codec._sq_norms.shape) == (1, 3000)
