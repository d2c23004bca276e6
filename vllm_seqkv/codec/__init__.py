"""KV codecs: baselines from the literature and the seqkv presets, by name."""

from __future__ import annotations

from typing import Callable

from vllm_seqkv.codec.base import CodecInputError, KVCodec, Packed, TensorCodec

__all__ = ["CodecInputError", "KVCodec", "Packed", "TensorCodec", "codec_names", "make_codec"]


def _factories() -> dict[str, Callable[[], KVCodec]]:
    from vllm_seqkv.codec.baselines import BASELINES
    from vllm_seqkv.codec.presets import PRESETS

    return {**BASELINES, **PRESETS}


def codec_names() -> list[str]:
    return list(_factories())


def make_codec(name: str) -> KVCodec:
    factories = _factories()
    if name not in factories:
        raise KeyError(f"unknown codec {name!r}; known: {', '.join(factories)}")
    return factories[name]()
