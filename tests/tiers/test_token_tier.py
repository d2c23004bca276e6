import math

import pytest

from vllm_seqkv.tiers.coders import TokenCoder
from vllm_seqkv.tiers import TokenTier


@pytest.fixture(scope="module")
def coder_and_ids():
    from transformers import AutoTokenizer

    import seqkv_fixtures as fixtures

    d = fixtures.tiny_model_dir()
    ids = AutoTokenizer.from_pretrained(d)(fixtures.corpus_path("test").read_text()[:3000])["input_ids"]
    return TokenCoder(d), ids[:160]


def test_token_tier_roundtrip_near_cross_entropy(coder_and_ids):
    coder, ids = coder_and_ids
    tier = TokenTier(coder)
    assert tier.save_tokens(b"blk", ids)
    assert tier.load_tokens(b"blk") == ids
    payload_bits = len(coder.encode(ids)) * 8
    ce_bits, tok_lp = coder.cross_entropy_bits(ids)
    ideal = -tok_lp.sum() / math.log(2)
    assert ideal == pytest.approx(ce_bits * len(ids))
    # range coder overhead: at most one 32-bit word of flush plus 5% over the model's own CE
    assert payload_bits <= 1.05 * ideal + 64
    # and it is far below storing the raw ids
    assert payload_bits < len(ids) * math.log2(coder.vocab)


def test_token_tier_corruption_is_a_miss(coder_and_ids):
    coder, ids = coder_and_ids
    tier = TokenTier(coder)
    tier.save_tokens(7, ids[:32])
    k = (7).to_bytes(32, "little", signed=True)
    b = bytearray(tier.storage.get(k))
    b[-1] ^= 0xFF
    tier.storage.put(k, bytes(b))
    assert tier.load_tokens(7) is None
