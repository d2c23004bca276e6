"""A throw-away local Redis/Valkey server (tests and benchmarks of the Redis tier)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator


def redis_binary(install: bool = False) -> str | None:
    """``redis-server`` or ``valkey-server`` on PATH; with ``install`` (root with apt-get),
    installs ``redis-server`` when neither is there."""
    exe = shutil.which("redis-server") or shutil.which("valkey-server")
    if exe is None and install and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update"], capture_output=True, env=env, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "redis-server"], capture_output=True,
                       env=env, timeout=600)
        exe = shutil.which("redis-server")
    return exe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_redis_server(exe: str, data_dir: Path) -> Iterator[dict]:
    """Start ``exe`` on a free local port without persistence; yields ``{"url", "proc",
    "port"}`` once it answers PING; terminates it on exit."""
    import redis

    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(data_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        else:
            raise RuntimeError(f"{exe} did not answer on port {port}")
        yield {"url": f"redis://127.0.0.1:{port}/0", "proc": proc, "port": port}
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(5)
