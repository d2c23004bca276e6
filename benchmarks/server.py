"""Start and stop a real `vllm serve` on 127.0.0.1 (benchmarks, examples' tests, e2e tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

OFFLINE_ENV = {"VLLM_HOST_IP": "127.0.0.1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """``vllm serve MODEL ARGS`` in its own process group, log captured to ``log_path``.

    NOTE: ``stop`` sends SIGINT to the API server only (as a shell's Ctrl-C reaches vLLM's
    main process, which shuts its engine down); the whole group is killed only when it does
    not exit within ``stop_timeout_s``.
    """

    def __init__(self, model: Path, args: list[str], log_path: Path, timeout_s: float = 300,
                 stop_timeout_s: float = 60):
        self.port = free_port()
        self.log_path = Path(log_path)
        self.timeout_s = timeout_s
        self.stop_timeout_s = stop_timeout_s
        vllm = Path(sys.executable).with_name("vllm")
        self.cmd = [str(vllm), "serve", str(model), "--host", "127.0.0.1",
                    "--port", str(self.port), *args]
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def __enter__(self) -> "VllmServer":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log_path.open("w")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     env={**os.environ, **OFFLINE_ENV}, start_new_session=True)
        deadline = time.time() + self.timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self._log_file.close()
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode} "
                                   f"(log {self.log_path}):\n{self.log()[-4000:]}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(1)
        self.stop()
        raise TimeoutError(f"vllm serve not healthy after {self.timeout_s}s "
                           f"(log {self.log_path}):\n{self.log()[-4000:]}")

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log_file.close()
        return self.proc.returncode

    def __exit__(self, *exc) -> None:
        self.stop()
