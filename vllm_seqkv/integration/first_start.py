"""Calibrate at first start: ``vllm serve MODEL --kv-cache-backend seqkv`` on a model without
a calibration for its preset fits one before serving.

Runs in the front-end process while vLLM builds the engine config, before any engine (and its
device memory) exists. The fit runs ``python -m vllm_seqkv.calibrate`` in a subprocess, so the
calibration engine's memory (GPU included) is freed before the serving engine starts; its
progress bar (with the remaining-time estimate) goes to this process's log. The subprocess
writes the file atomically under a file lock (:func:`vllm_seqkv.calibrate.ensure`): concurrent
starts on the same cache wait for one fit and reuse it. A corrupt or foreign file is refitted,
never trusted. ``auto_calibrate: false`` keeps today's error naming the command to run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from vllm_seqkv.codec.calibration import CalibrationError
from vllm_seqkv.config import SeqKVConfig


def ensure_calibrated(config: SeqKVConfig, model_dir: str, tensor_parallel_size: int = 1,
                      log=None) -> Path | None:
    """The calibration file the engine will load, fitted now if missing or unusable; None when
    the preset needs none or the config names an explicit file (loaded, and checked, later)."""
    from vllm_seqkv import calibrate
    from vllm_seqkv.codec import needs_calibration

    if not config.enabled or not needs_calibration(config.preset) or config.calibration:
        return None
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise CalibrationError(
            f"seqkv calibrates local model directories; {model_dir} has no config.json "
            "(download the model and serve its directory)")
    path = calibrate.default_path(model_dir, config.preset)
    try:
        calibrate.load(path, config.preset)
        return path
    except CalibrationError as exc:
        if not config.auto_calibrate:
            if path.exists():
                raise CalibrationError(f"{exc}; refit it with `python -m vllm_seqkv.calibrate "
                                       f"{model_dir} --preset {config.preset}`") from None
            return None  # the engine's own load raises the usual message with the command
        reason = "missing" if not path.exists() else str(exc)
    command = [sys.executable, "-m", "vllm_seqkv.calibrate", str(model_dir), "--preset",
               config.preset, "--no-cold-prior", "--tensor-parallel-size", str(tensor_parallel_size)]
    say = log or (lambda msg, *a: print(msg % a, file=sys.stderr))
    say("seqkv: calibrating %s for preset %s before serving (%s): %d tokens of the general "
        "set through vLLM, once per model (the progress bar below estimates the time left); "
        "set auto_calibrate false to refuse instead", model_dir, config.preset, reason,
        calibrate.DEFAULT_TOKENS)
    started = time.monotonic()
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": os.environ.get(
        "VLLM_ENABLE_V1_MULTIPROCESSING", "1")}
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise CalibrationError(f"seqkv calibration of {model_dir} failed (exit {done.returncode}; "
                               f"its log is above): {' '.join(command)}")
    say("seqkv: calibration %s written in %.0f s", path, time.monotonic() - started)
    calibrate.load(path, config.preset)  # what the subprocess wrote must load here too
    return path
