import os
import shutil
import socket
import subprocess
import time

import pytest


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_binary():
    exe = shutil.which("redis-server") or shutil.which("valkey-server")
    if exe is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update"], capture_output=True, env=env, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "redis-server"], capture_output=True,
                       env=env, timeout=600)
        exe = shutil.which("redis-server")
    return exe


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    pytest.importorskip("redis", reason="the `redis` client is not installed (pip install redis)")
    exe = _redis_binary()
    if exe is None:
        pytest.skip("no redis-server/valkey-server and apt-get could not install one")
    port = _free_port()
    d = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(d)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("redis-server did not start")
    yield {"url": f"redis://127.0.0.1:{port}/0", "proc": proc, "port": port}
    if proc.poll() is None:
        proc.terminate()
        proc.wait(5)
