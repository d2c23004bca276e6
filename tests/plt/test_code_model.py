"""CodeModelCodec: symbol-level lossless coder of the hot code (vllm_seqkv/plt/code_model.py)."""

import numpy as np
import pytest

from vllm_seqkv.plt.code_model import CodeModelCodec, kv_layouts
from vllm_seqkv.plt.entropy import ColdCodec, SplitCodec
from vllm_seqkv.plt.tiers import MemoryTier

HEADER = 5  # mode byte + 4 tag bytes


@pytest.fixture(scope="module")
def coded():
    """Real seqkv-3 blocks of the tiny trained model: layouts from its codec, prior on train."""
    from transformers import AutoTokenizer

    from vllm_seqkv import fixtures
    from vllm_seqkv.calibrate import load_for_model
    from vllm_seqkv.codec import make_codec
    from vllm_seqkv.plt.kvbytes import model_blocks

    d = fixtures.tiny_model_dir()
    tok = AutoTokenizer.from_pretrained(d)
    train = tok(fixtures.corpus_path("train").read_text()[:40000])["input_ids"][:1024]
    test = tok(fixtures.corpus_path("test").read_text()[:8000])["input_ids"][:128]
    btr, cols, elems = model_blocks(d, train)
    bte, _, _ = model_blocks(d, test)
    kv = make_codec("seqkv-3", load_for_model(d, "seqkv-3"))
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(d)
    layers, heads = cfg.num_hidden_layers, cfg.num_key_value_heads
    head_dim = cfg.head_dim
    layouts = kv_layouts(kv, layers, heads, head_dim)
    slot = layouts[0].row_bytes // heads
    assert heads * slot == cols
    return {"codec": CodeModelCodec.fit(layouts, btr, heads, slot), "layouts": layouts,
            "heads": heads, "slot": slot, "train": btr, "test": bte, "cols": cols, "elems": elems}


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
    assert payload[0] == 1  # coded, not stored
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
