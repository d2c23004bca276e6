import errno
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from vllm_seqkv.tiers import blob
from vllm_seqkv.tiers.coders import ColdCodec
from vllm_seqkv.tiers import DiskTier, MemoryTier, Tier
from vllm_seqkv.tiers.blob import BlobCodec
from vllm_seqkv.tiers.storage import MemoryStorage
from vllm_seqkv.tiers import disk as disk_mod


@pytest.fixture(scope="module")
def kv_blocks():
    """Real hot-code bytes of the tiny trained model (train text fits the prior, test is coded)."""
    from transformers import AutoTokenizer

    import seqkv_fixtures as fixtures
    from vllm_seqkv.calibrate import codec_for_model
    from vllm_seqkv.tiers.cold_prior import model_blocks

    d = fixtures.tiny_model_dir()
    tok = AutoTokenizer.from_pretrained(d)
    train = tok(fixtures.corpus_path("train").read_text()[:8000])["input_ids"][:256]
    test = tok(fixtures.corpus_path("test").read_text()[:8000])["input_ids"][:128]
    kv = codec_for_model(d, "seqkv-3")
    btr, cols, elems = model_blocks(d, train, 16, kv)
    bte, _, _ = model_blocks(d, test, 16, kv)
    return ColdCodec.fit(btr, cols), bte, elems


def test_cold_codec_bit_exact_and_smaller_than_hot_code(kv_blocks):
    codec, blocks, elems = kv_blocks
    coded = [codec.encode(b) for b in blocks]
    assert all(codec.decode(c, len(b)) == b for c, b in zip(coded, blocks))
    # never expands by more than the mode byte (the transform presets' packed codes are
    # near-incompressible bytes; see BENCHMARKS.md), and shrinks bytes with structure
    assert sum(map(len, coded)) <= sum(map(len, blocks)) + len(blocks)
    skewed = np.random.default_rng(0).geometric(0.5, len(blocks[0])).clip(0, 255).astype(np.uint8)
    plain = ColdCodec(codec.columns)
    assert len(plain.encode(skewed.tobytes())) < 0.8 * len(blocks[0])
    assert plain.decode(plain.encode(skewed.tobytes()), len(blocks[0])) == skewed.tobytes()
    # an uncalibrated (uniform-prior) codec is still lossless
    u = ColdCodec(codec.columns)
    assert u.decode(u.encode(blocks[0]), len(blocks[0])) == blocks[0]


def test_memory_tier_roundtrip_and_capacity(kv_blocks):
    codec, blocks, _ = kv_blocks
    tier = MemoryTier(codec)
    for i, b in enumerate(blocks):
        assert tier.save(i, b)
    assert all(tier.load(i) == b for i, b in enumerate(blocks))
    assert tier.held.nbytes <= tier.held.raw_nbytes + len(blocks) * (blob.HEADER_BYTES + 1)
    small = MemoryTier(codec, capacity_bytes=tier.held.nbytes // 2)
    for i, b in enumerate(blocks):
        small.save(i, b)
    assert small.held.nbytes <= small.capacity_bytes and 0 < len(small) < len(blocks)
    assert small.load(len(blocks) - 1) == blocks[-1]  # newest kept, oldest evicted
    assert small.load(0) is None


@pytest.mark.parametrize("damage", ["flip", "truncate", "version", "empty"])
def test_corrupt_blob_is_a_miss(tmp_path, kv_blocks, damage, caplog):
    codec, blocks, _ = kv_blocks
    tier = DiskTier(tmp_path, codec)
    key = b"k" * 16
    assert tier.save(key, blocks[0])
    p = tier.storage.path(key)
    data = bytearray(p.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x10
    elif damage == "truncate":
        data = data[:len(data) - 7]
    elif damage == "version":
        data[4] = blob.FORMAT_VERSION + 1
    else:
        data = bytearray()
    p.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="vllm_seqkv.plt"):
        assert tier.load(key) is None
    assert "corrupt" in caplog.text
    assert not p.exists()  # dropped, recomputed next time


def test_blob_refuses_other_key_and_other_model(kv_blocks):
    codec, blocks, _ = kv_blocks
    b = BlobCodec(codec).encode(b"a", blocks[0])
    with pytest.raises(blob.BlobError):
        blob.unpack(b, b"b", codec.codec_id, codec.tag)
    with pytest.raises(blob.BlobError):
        blob.unpack(b, b"a", codec.codec_id, ColdCodec(codec.columns).tag)
    storage = MemoryStorage()
    storage.put(b"b", b)  # a blob filed under the wrong key
    assert Tier(storage, codec).load(b"b") is None


def test_disk_full_evicts_and_never_raises(tmp_path, kv_blocks, monkeypatch, caplog):
    codec, blocks, _ = kv_blocks
    tier = DiskTier(tmp_path, codec)
    for i in range(4):
        assert tier.save(i, blocks[i])
    real = os.write
    state = {"fail": 1}

    def full_once(fd, data):
        if state["fail"]:
            state["fail"] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(disk_mod, "_os_write", full_once)
    with caplog.at_level(logging.WARNING, logger="vllm_seqkv.plt"):
        assert tier.save(99, blocks[4])  # evicts, retries, succeeds
    assert tier.stats.evictions >= 1 and tier.load(99) == blocks[4]
    assert "full" in caplog.text
    monkeypatch.setattr(disk_mod, "_os_write",
                        lambda fd, d: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    assert tier.save(100, blocks[5]) is False  # still full after eviction: no crash
    assert tier.load(100) is None
    assert not list(tmp_path.glob(".tmp-*"))


def test_disk_quota_evicts(tmp_path, kv_blocks):
    codec, blocks, _ = kv_blocks
    one = len(BlobCodec(codec).encode(0, blocks[0]))
    tier = DiskTier(tmp_path, codec, capacity_bytes=int(one * 2.5))
    for i, b in enumerate(blocks[:5]):
        assert tier.save(i, b)
    on_disk = sum(p.stat().st_size for p in tmp_path.glob("*.blob"))
    assert on_disk <= tier.capacity_bytes and tier.load(4) == blocks[4]
    # a new process on the same directory sees the surviving blobs
    again = DiskTier(tmp_path, codec)
    assert again.load(4) == blocks[4] and len(again) == len(tier)


_WRITER = """
import sys, os
sys.path.insert(0, {root!r})
from vllm_seqkv.tiers import disk
real = disk._os_write
def slow(fd, data):
    n = real(fd, data[:4096])
    if not os.path.exists({flag!r}):
        open({flag!r}, "w").close()
    import time; time.sleep(0.01)
    return n
disk._os_write = slow
disk.atomic_write(__import__("pathlib").Path({target!r}), b"x" * (64 << 20))
"""


def test_killed_writer_leaves_no_trusted_blob(tmp_path, kv_blocks):
    codec, blocks, _ = kv_blocks
    tier = DiskTier(tmp_path / "d", codec)
    key = b"\x01" * 16
    flag = tmp_path / "started"
    code = _WRITER.format(root=os.getcwd(), flag=str(flag), target=str(tier.storage.path(key)))
    proc = subprocess.Popen([sys.executable, "-c", code])
    for _ in range(400):
        if flag.exists():
            break
        time.sleep(0.02)
    assert flag.exists(), "writer never started"
    time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list((tmp_path / "d").glob(".tmp-*"))  # the half-written temp file is there
    assert not tier.storage.path(key).exists()
    assert tier.load(key) is None
    reopened = DiskTier(tmp_path / "d", codec)
    assert not list((tmp_path / "d").glob(".tmp-*")) and reopened.load(key) is None
    assert reopened.save(key, blocks[0]) and reopened.load(key) == blocks[0]
