"""Named seqkv codec presets (the hot-tier codec of the vLLM backend)."""

from __future__ import annotations

from typing import Callable

from vllm_seqkv.codec.base import KVCodec

PRESETS: dict[str, Callable[[], KVCodec]] = {}
