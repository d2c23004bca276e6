"""Work off the caller's thread: :class:`JobThread` runs ``run(job)`` for each submitted
job, in order, on one thread; ``take_finished`` hands back ``(job, result)`` pairs (result
None when ``run`` raised). The caller decides what a result means and when to publish it (the
KV connector's loads: it installs sink rows and reports the request on its own thread).

Saving: :class:`BackgroundSaver` is a JobThread that encodes and stores, the caller only
hands over bytes. ``submit(key, data)`` queues a copy of a block's bytes and returns at once;
the thread runs ``tier.encode_block`` (the entropy coder, the slow part) without any lock,
then ``tier.save_encoded`` under ``lock``. Whoever else calls the tier (loads, touches, byte
counts) holds ``lock`` too. ``take_finished`` tells which keys were stored (True) or could not
be (False); until then a key is neither held nor lost.

Pending bytes are bounded: beyond ``max_pending_bytes`` ``submit`` refuses (False), so a slow
disk or coder turns into missed saves (later recomputes), never into a stalled engine or
unbounded memory. ``close`` stores what is queued, then stops the thread; a process killed
before that loses only saves nobody was told about (the disk tier writes atomically).
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any, Callable

from vllm_seqkv.tiers.tier import Tier, log


class JobThread:
    """One thread that runs ``run(job)`` for each submitted job, first in, first out."""

    def __init__(self, run: Callable[[Any], Any], name: str):
        self.run = run
        self._cv = threading.Condition()
        self._jobs: collections.deque = collections.deque()
        self._busy = False
        self._closed = False
        self._finished: list[tuple[Any, Any]] = []
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self._closed

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

    def close(self, timeout: float | None = None, drop_late: bool = True) -> bool:
        """Run the queued jobs, then stop the thread; False if they did not finish in time.
        Then ``drop_late`` drops the jobs not started yet; otherwise the (daemon) thread goes
        on with them until the process ends."""
        done = self.flush(timeout)
        with self._cv:
            self._closed = True
            if drop_late:
                self._jobs.clear()
            self._cv.notify_all()
        self._thread.join(timeout if done or not drop_late else 0)
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
            except Exception:  # a bug must not kill the thread and stall every later job
                log.exception("background job of %s failed", self._thread.name)
            finally:
                with self._cv:
                    self._busy = False
                    self._finished.append((job, result))
                    self._cv.notify_all()


class BackgroundSaver:
    def __init__(self, tier: Tier, lock: threading.Lock, max_pending_bytes: int):
        if max_pending_bytes <= 0:
            raise ValueError("max_pending_bytes must be positive")
        self.tier = tier
        self.lock = lock
        self.max_pending_bytes = max_pending_bytes
        self.save_s = 0.0  # time the thread spent encoding and storing
        self._pending_bytes = 0
        self._count = threading.Lock()  # NOTE: guards _pending_bytes and save_s
        self._worker = JobThread(self._save, name="seqkv-cold-saver")

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def can_submit(self, nbytes: int) -> bool:
        return not self._worker.closed and self._pending_bytes + nbytes <= self.max_pending_bytes

    def submit(self, key: bytes, data: bytes) -> bool:
        """Queue ``data`` for ``key``; False (nothing queued) when closed or over the bound."""
        with self._count:
            if not self.can_submit(len(data)):
                return False
            self._pending_bytes += len(data)
        if self._worker.submit((key, bytes(data))):
            return True
        with self._count:  # closed meanwhile
            self._pending_bytes -= len(data)
        return False

    def take_finished(self) -> list[tuple[bytes, bool]]:
        """(key, stored) of the saves finished since the last call."""
        return [(key, bool(ok)) for (key, _), ok in self._worker.take_finished()]

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every submitted save has finished; False on timeout."""
        return self._worker.flush(timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Finish the queued saves, then stop the thread; False if they did not finish in time."""
        return self._worker.close(timeout, drop_late=False)

    def _save(self, job: tuple[bytes, bytes]) -> bool:
        key, data = job
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
            with self._count:
                self.save_s += time.perf_counter() - t0
                self._pending_bytes -= len(data)
        return ok
