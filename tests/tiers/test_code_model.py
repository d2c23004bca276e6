"""CodeModelCodec: symbol-level lossless coder of the hot code (vllm_seqkv/tiers/code_model.py)."""

import numpy as np
import pytest

from vllm_seqkv.tiers.code_model import CodeModelCodec, _floor_bins
from vllm_seqkv.tiers.coders import ColdCodec, SplitCodec
from vllm_seqkv.tiers import MemoryTier

HEADER = 5  # mode byte + 4 tag bytes


@pytest.fixture(scope="module")
def coded():
    """Real seqkv-3 blocks of the tiny trained model: layouts from its codec, prior on train."""
    from transformers import AutoTokenizer

    import seqkv_fixtures as fixtures
    from vllm_seqkv.calibrate import codec_for_model
    from vllm_seqkv.tiers.cold_prior import code_model_for, model_blocks

    d = fixtures.tiny_model_dir()
    tok = AutoTokenizer.from_pretrained(d)
    train = tok(fixtures.corpus_path("train").read_text()[:40000])["input_ids"][:1024]
    test = tok(fixtures.corpus_path("test").read_text()[:8000])["input_ids"][:128]
    kv = codec_for_model(d, "seqkv-3")
    btr, cols, elems = model_blocks(d, train, 16, kv)
    bte, _, _ = model_blocks(d, test, 16, kv)
    codec = code_model_for(d, btr, kv)  # layouts from the model's seqkv-3 codec, prior on train
    heads, slot = codec.heads, codec.slot_bytes
    assert heads * slot == cols
    return {"codec": codec, "layouts": codec.layouts, "heads": heads, "slot": slot,
            "train": btr, "test": bte, "cols": cols, "elems": elems}


def test_layout_matches_the_slot_anatomy(coded):
    lays, heads, slot = coded["layouts"], coded["heads"], coded["slot"]
    # layer 0: token-table ids (int32 K and V per head), the rest of the slot is padding
    assert len(lays[0].code_width) == 0 and len(lays[0].id_offsets) == 2 * heads
    assert len(lays[0].extra) == heads * (slot - 8)
    # transform layers: codes cover every bit of the slot
    for lay in lays[1:]:
        assert int(lay.code_width.sum()) == heads * slot * 8 and len(lay.extra) == 0


def test_roundtrip_bit_exact(coded):
    codec = coded["codec"]
    structural = CodeModelCodec.structural(coded["layouts"], coded["heads"], coded["slot"])
    for c in (codec, structural):
        for b in coded["test"] + coded["train"][:4]:
            assert c.decode(c.encode(b), len(b)) == b
    # any number of tokens per record, including a single one
    one = np.frombuffer(coded["test"][0], np.uint8).reshape(len(coded["layouts"]), 16, -1)[:, :1]
    raw = one.tobytes()
    assert codec.decode(codec.encode(raw), len(raw)) == raw


def test_never_expands_beyond_header(coded):
    codec = coded["codec"]
    for b in coded["test"]:
        assert len(codec.encode(b)) <= len(b) + HEADER
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, len(coded["test"][0]), dtype=np.uint8).tobytes()
    assert len(codec.encode(noise)) <= len(noise) + HEADER  # ids out of vocab: stored
    assert codec.decode(codec.encode(noise), len(noise)) == noise
    # layer-0 ids valid but the codes random: still never expands, still exact
    mixed = np.frombuffer(noise, np.uint8).reshape(len(coded["layouts"]), 16, -1).copy()
    mixed[0] = np.frombuffer(coded["test"][0], np.uint8).reshape(mixed.shape)[0]
    m = mixed.tobytes()
    assert len(codec.encode(m)) <= len(m) + HEADER and codec.decode(codec.encode(m), len(m)) == m


def test_smaller_than_cold_codec_on_transform_blocks(coded):
    codec, blocks = coded["codec"], coded["test"]
    cold = ColdCodec.fit(coded["train"], coded["cols"])
    ours = sum(len(codec.encode(b)) for b in blocks)
    theirs = sum(len(cold.encode(b)) for b in blocks)
    raw = sum(map(len, blocks))
    assert ours < 0.8 * theirs and ours < 0.7 * raw
    # without training data the structure alone (ids, padding) still beats raw
    structural = CodeModelCodec.structural(coded["layouts"], coded["heads"], coded["slot"])
    assert sum(len(structural.encode(b)) for b in blocks) < 0.8 * raw


def test_refuses_other_model_and_truncated_payloads(coded):
    codec, b = coded["codec"], coded["test"][0]
    other = CodeModelCodec.structural(coded["layouts"], coded["heads"], coded["slot"])
    assert other.tag != codec.tag
    payload = codec.encode(b)
    assert payload[0] == 2  # coded (batched order), not stored
    with pytest.raises(ValueError, match="another model"):
        other.decode(payload, len(b))
    for cut in (1, 3, 4, 8, len(payload) // 2, len(payload) - HEADER):
        with pytest.raises(ValueError):
            codec.decode(payload[:len(payload) - cut], len(b))
    with pytest.raises(ValueError):
        codec.decode(payload[:2], len(b))
    with pytest.raises(ValueError, match="whole number of tokens"):
        codec.encode(b[:-1])
    stored = codec.encode(np.full(len(b), 255, np.uint8).tobytes())
    assert stored[0] == 0
    with pytest.raises(ValueError):
        codec.decode(stored[:-1], len(b))


def test_prior_save_load_and_tier(tmp_path, coded):
    codec, blocks = coded["codec"], coded["test"]
    codec.save_prior(tmp_path / "prior.npz")
    again = CodeModelCodec.load_prior(tmp_path / "prior.npz")
    assert again.tag == codec.tag
    assert again.decode(codec.encode(blocks[1]), len(blocks[1])) == blocks[1]
    # as the connector would use it: pages through the coder, a sink tail raw
    split = SplitCodec(codec, len(blocks[0]))
    tier = MemoryTier(split)
    for i, b in enumerate(blocks):
        assert tier.save(i, b + b"\x00\x00\x00\x00")
    assert all(tier.load(i) == b + b"\x00\x00\x00\x00" for i, b in enumerate(blocks))


def test_refuses_the_former_payload_format(coded):
    """Mode 1 (per-layer symbol order, before batching) is refused, not misdecoded."""
    codec, b = coded["codec"], coded["test"][0]
    payload = codec.encode(b)
    with pytest.raises(ValueError, match="older format"):
        codec.decode(bytes([1]) + payload[1:], len(b))
    with pytest.raises(ValueError, match="unknown code-model payload mode"):
        codec.decode(bytes([3]) + payload[1:], len(b))


def _reference(m, rows):
    """Codes and bins of one layer's ``rows [T, row_bytes]`` the direct way (bits, int64)."""
    lay = m.layout
    bits = np.unpackbits(rows, axis=-1, bitorder="little").astype(np.int64)
    pow2 = np.where(np.arange(8)[None] < lay.code_width[:, None], 1 << np.arange(8)[None], 0)
    codes = (bits[:, lay.code_pos] * pow2).sum(-1)  # [T, n]
    u = np.take_along_axis(m.lut[None], codes[:, :, None], 2)[:, :, 0]
    mu = u @ m.weight.T + m.bias
    return codes, np.clip((mu - m.bin_lo) // m.bin_w, 0, m.bins - 1)


def test_batched_codes_and_bins_match_integer_reference(coded):
    codec = coded["codec"]
    plan = codec.codes
    layers = len(codec.models)
    for b in coded["test"][:3]:
        rec = np.frombuffer(b, np.uint8).reshape(layers, -1, codec.row_bytes)
        T = rec.shape[1]
        codes = np.zeros((len(plan.layers) * plan.stages * plan.P, T), np.uint8)
        plan.unpack(np.ascontiguousarray(rec.transpose(0, 2, 1)).reshape(-1, T), codes)
        codes = codes.reshape(len(plan.layers), -1, T)
        levels = plan._levels(codes, slice(None))
        bins = np.concatenate([plan._bins(levels, s).reshape(len(plan.layers), plan.P, T)
                               for s in range(plan.stages)], axis=1)
        spread = 0
        for li, layer in enumerate(plan.layers):
            ref_codes, ref_bins = _reference(codec.models[layer], rec[layer])
            slot = plan.slots[li]
            assert (codes[li][slot].T == ref_codes).all()
            assert (bins[li][slot].T == ref_bins).all()
            spread += len(np.unique(ref_bins))
        assert spread > 2 * len(plan.layers)  # the contexts are not trivial


def test_float_bins_are_exact_at_bin_edges():
    """floor((x + 1/2) * fl(1/bw)) == x // bw for integers up to the model bound, including
    exact multiples of bw and their neighbours."""
    rng = np.random.default_rng(0)
    bw = np.concatenate([[1, 2, 3, 7, 10, 1 << 20, (1 << 40) + 1, 1 << 62],
                         rng.integers(1, 1 << 45, 200)])
    k = rng.integers(-20, 20, (len(bw), 64))
    x = k * np.minimum(bw, 1 << 44)[:, None] + rng.integers(-1, 2, k.shape)  # at/next to edges
    x = np.concatenate([x, rng.integers(-(1 << 49), 1 << 49, (len(bw), 64))], 1)
    top = 1 << 20
    got = _floor_bins(x.astype(np.float64) + 0.5, (1.0 / bw.astype(np.float64))[:, None],
                      np.full((len(bw), 1), top, np.float64))
    want = np.clip(x // bw[:, None], 0, top)
    assert (got == want).all()
