import logging


from vllm_seqkv.tiers.coders import ColdCodec
from vllm_seqkv.tiers import RedisTier


def _blocks(n=4, cols=24):
    import numpy as np

    rng = np.random.default_rng(0)
    return [rng.integers(0, 60, 16 * cols, dtype=np.uint8).tobytes() for _ in range(n)], cols


def test_redis_roundtrip_and_corruption(redis_server, caplog):
    blocks, cols = _blocks()
    tier = RedisTier(redis_server["url"], ColdCodec(cols), prefix=b"t1:")
    for i, b in enumerate(blocks):
        assert tier.save(i, b)
    assert [tier.load(i) for i in range(len(blocks))] == blocks
    assert 0 in tier and 77 not in tier
    key = (0).to_bytes(32, "little", signed=True)
    raw = bytearray(tier.storage.get(key))
    raw[-3] ^= 1
    tier.storage.put(key, bytes(raw))
    with caplog.at_level(logging.WARNING, logger="vllm_seqkv.plt"):
        assert tier.load(0) is None
    assert "corrupt" in caplog.text


def test_redis_down_is_a_miss_with_warning(redis_server, caplog):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    blocks, cols = _blocks(1)
    tier = RedisTier(f"redis://127.0.0.1:{port}/0", ColdCodec(cols), timeout_s=0.2)
    with caplog.at_level(logging.WARNING, logger="vllm_seqkv.plt"):
        assert tier.save(1, blocks[0]) is False
        assert tier.load(1) is None
    assert "failed" in caplog.text and tier.stats.errors >= 2


def test_redis_killed_mid_session(redis_server, caplog):
    """Last test of the session on this server: stop it and keep calling the tier."""
    blocks, cols = _blocks(2)
    tier = RedisTier(redis_server["url"], ColdCodec(cols), prefix=b"t3:", timeout_s=0.2)
    assert tier.save(5, blocks[0]) and tier.load(5) == blocks[0]
    redis_server["proc"].terminate()
    redis_server["proc"].wait(5)
    with caplog.at_level(logging.WARNING, logger="vllm_seqkv.plt"):
        assert tier.load(5) is None
        assert tier.save(6, blocks[1]) is False
    assert "treating as a miss" in caplog.text
