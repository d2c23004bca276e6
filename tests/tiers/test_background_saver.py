"""The background saver: bytes handed over are stored later, bounded, and never lost silently."""

import threading

import pytest

from vllm_seqkv.tiers import BackgroundSaver, MemoryTier, Tier
from vllm_seqkv.tiers.coders import RawCodec
from vllm_seqkv.tiers.disk import DiskStorage


class SlowCodec(RawCodec):
    """Encoding waits for ``gate``: lets a test hold saves in flight."""

    def __init__(self):
        self.gate = threading.Event()

    def encode(self, data):
        self.gate.wait(10)
        return super().encode(data)


def test_submitted_saves_are_stored_and_reported():
    tier = MemoryTier()
    saver = BackgroundSaver(tier, threading.Lock(), 1 << 20)
    for i in range(5):
        assert saver.submit(bytes([i]) * 20, bytes([i]) * 100)
    assert saver.close(10)
    assert sorted(saver.take_finished()) == [(bytes([i]) * 20, True) for i in range(5)]
    assert all(tier.load(bytes([i]) * 20) == bytes([i]) * 100 for i in range(5))
    assert not saver.submit(b"x" * 20, b"late")  # closed


def test_pending_bytes_are_bounded_and_a_refused_save_queues_nothing():
    slow = SlowCodec()
    tier = MemoryTier(slow)
    saver = BackgroundSaver(tier, threading.Lock(), 250)
    assert saver.submit(b"a" * 20, b"1" * 100)
    assert saver.submit(b"b" * 20, b"2" * 100)
    assert not saver.submit(b"c" * 20, b"3" * 100)  # 300 > 250 bytes pending
    assert saver.pending_bytes == 200
    assert not saver.flush(0.05)  # held at the gate
    slow.gate.set()
    assert saver.flush(10) and saver.pending_bytes == 0
    assert saver.submit(b"c" * 20, b"3" * 100)
    saver.close(10)
    assert {k for k, ok in saver.take_finished() if ok} == {b"a" * 20, b"b" * 20, b"c" * 20}


def test_a_failing_tier_is_reported_and_the_thread_goes_on(tmp_path, caplog):
    class Broken(DiskStorage):
        def put(self, key, blob):
            if key.startswith(b"bad"):
                raise RuntimeError("boom")
            super().put(key, blob)

    tier = Tier(Broken(tmp_path))
    saver = BackgroundSaver(tier, threading.Lock(), 1 << 20)
    saver.submit(b"bad" * 7, b"x" * 50)
    saver.submit(b"good" * 5, b"y" * 50)
    assert saver.close(10)
    assert dict(saver.take_finished()) == {b"bad" * 7: False, b"good" * 5: True}
    assert "save of" in caplog.text and tier.load(b"good" * 5) == b"y" * 50
    assert b"bad" * 7 not in tier


def test_encoding_runs_outside_the_tier_lock():
    slow = SlowCodec()
    tier = MemoryTier(slow)
    lock = threading.Lock()
    saver = BackgroundSaver(tier, lock, 1 << 20)
    saver.submit(b"a" * 20, b"1" * 100)
    assert lock.acquire(timeout=1)  # the saver is inside encode_block, not holding the lock
    lock.release()
    slow.gate.set()
    saver.close(10)


def test_bad_bound_is_refused():
    with pytest.raises(ValueError, match="max_pending_bytes"):
        BackgroundSaver(MemoryTier(), threading.Lock(), 0)
