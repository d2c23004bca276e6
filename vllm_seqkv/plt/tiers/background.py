"""Saving off the caller's thread: one background thread encodes and stores, the caller only hands over bytes.

``submit(key, data)`` queues a copy of a block's bytes and returns at once; the thread runs
``tier.encode_block`` (the entropy coder, the slow part) without any lock, then
``tier.save_encoded`` under ``lock``. Whoever else calls the tier (loads, touches, byte
counts) holds ``lock`` too. ``take_finished`` tells which keys were stored (True) or could not
be (False); until then a key is neither held nor lost.

Pending bytes are bounded: beyond ``max_pending_bytes`` ``submit`` refuses (False), so a slow
disk or coder turns into missed saves (later recomputes), never into a stalled engine or
unbounded memory. ``close`` stores what is queued, then stops the thread; a process killed
before that loses only saves nobody was told about (the disk tier writes atomically).

Loading off the caller's thread: :class:`BackgroundLoader` runs ``run(job)`` for each
submitted job, in order, on one thread; ``take_finished`` hands back ``(job, result)`` pairs
(result None when ``run`` raised). The caller decides what a result means and when to
publish it (the KV connector installs sink rows and reports the request on its own thread).
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any, Callable

from vllm_seqkv.plt.tiers.base import Tier, log


class BackgroundSaver:
    def __init__(self, tier: Tier, lock: threading.Lock, max_pending_bytes: int):
        if max_pending_bytes <= 0:
            raise ValueError("max_pending_bytes must be positive")
        self.tier = tier
        self.lock = lock
        self.max_pending_bytes = max_pending_bytes
        self.save_s = 0.0  # time the thread spent encoding and storing
        self._cv = threading.Condition()
        self._jobs: collections.deque[tuple[bytes, bytes]] = collections.deque()
        self._pending_bytes = 0
        self._busy = False
        self._closed = False
        self._finished: list[tuple[bytes, bool]] = []
        self._thread = threading.Thread(target=self._run, name="seqkv-cold-saver", daemon=True)
        self._thread.start()

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def can_submit(self, nbytes: int) -> bool:
        return not self._closed and self._pending_bytes + nbytes <= self.max_pending_bytes

    def submit(self, key: bytes, data: bytes) -> bool:
        """Queue ``data`` for ``key``; False (nothing queued) when closed or over the bound."""
        with self._cv:
            if not self.can_submit(len(data)):
                return False
            self._jobs.append((key, bytes(data)))
            self._pending_bytes += len(data)
            self._cv.notify_all()
        return True

    def take_finished(self) -> list[tuple[bytes, bool]]:
        """(key, stored) of the saves finished since the last call."""
        with self._cv:
            out, self._finished = self._finished, []
        return out

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every submitted save has finished; False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._jobs and not self._busy, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Finish the queued saves, then stop the thread; False if they did not finish in time."""
        done = self.flush(timeout)
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout)
        return done

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._jobs or self._closed)
                if not self._jobs:
                    return
                key, data = self._jobs.popleft()
                self._busy = True
            t0 = time.perf_counter()
            ok = False
            try:
                blob = self.tier.encode_block(key, data)
                if blob is not None:
                    with self.lock:
                        ok = self.tier.save_encoded(key, blob, len(data))
            except Exception:  # a bug must not kill the thread and stall every later save
                log.exception("%s: background save of %s failed", self.tier.name, key.hex()[:16])
            finally:
                with self._cv:
                    self.save_s += time.perf_counter() - t0
                    self._pending_bytes -= len(data)
                    self._busy = False
                    self._finished.append((key, ok))
                    self._cv.notify_all()


class BackgroundLoader:
    """One thread that runs ``run(job)`` for each submitted job, first in, first out."""

    def __init__(self, run: Callable[[Any], Any], name: str = "seqkv-cold-loader"):
        self.run = run
        self._cv = threading.Condition()
        self._jobs: collections.deque = collections.deque()
        self._busy = False
        self._closed = False
        self._finished: list[tuple[Any, Any]] = []
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Jobs submitted and not finished yet (queued or running)."""
        with self._cv:
            return len(self._jobs) + self._busy

    def submit(self, job) -> bool:
        """Queue ``job``; False (nothing queued) once closed."""
        with self._cv:
            if self._closed:
                return False
            self._jobs.append(job)
            self._cv.notify_all()
        return True

    def take_finished(self) -> list[tuple[Any, Any]]:
        """(job, result) of the jobs finished since the last call, in submission order."""
        with self._cv:
            out, self._finished = self._finished, []
        return out

    def wait_finished(self, timeout: float | None = None) -> bool:
        """Wait until some job has finished and not been taken yet; False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: bool(self._finished), timeout)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every submitted job has finished; False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._jobs and not self._busy, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Run the queued jobs, then stop the thread; False if they did not finish in time
        (the thread is a daemon: the rest is dropped with the process)."""
        done = self.flush(timeout)
        with self._cv:
            self._closed = True
            self._jobs.clear()  # after a timeout: the queued jobs are dropped, not started
            self._cv.notify_all()
        self._thread.join(timeout if done else 0)
        return done

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._jobs or self._closed)
                if not self._jobs:
                    return
                job = self._jobs.popleft()
                self._busy = True
            result = None
            try:
                result = self.run(job)
            except Exception:  # a bug must not kill the thread and stall every later load
                log.exception("background load job failed")
            finally:
                with self._cv:
                    self._busy = False
                    self._finished.append((job, result))
                    self._cv.notify_all()
