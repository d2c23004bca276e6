"""Where vllm-seqkv keeps what it builds once per machine (calibrations, fixtures)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """``$SEQKV_HOME``, default ``~/.cache/vllm-seqkv``."""
    return Path(os.environ.get("SEQKV_HOME", Path.home() / ".cache" / "vllm-seqkv"))
