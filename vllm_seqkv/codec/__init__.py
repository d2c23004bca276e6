"""KV codecs: baselines from the literature and the seqkv presets, by name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm_seqkv.codec.base import CodecInputError, KVCodec, Packed, TensorCodec

if TYPE_CHECKING:
    from vllm_seqkv.codec.calibration import Calibration, TransformCalibration

__all__ = ["CodecInputError", "KVCodec", "Packed", "TensorCodec", "codec_names", "make_codec", "needs_calibration"]


def codec_names() -> list[str]:
    from vllm_seqkv.codec.baselines import BASELINES
    from vllm_seqkv.codec.presets import PRESETS

    return [*BASELINES, *PRESETS]


def needs_calibration(name: str) -> bool:
    from vllm_seqkv.codec.presets import PRESETS

    return name in PRESETS and PRESETS[name].calibration_kind != "none"


def make_codec(name: str, calibration: "Calibration | TransformCalibration | None" = None) -> KVCodec:
    """Baselines take no calibration; seqkv presets take the model's (see calibrate.py)."""
    from vllm_seqkv.codec.baselines import BASELINES
    from vllm_seqkv.codec.presets import PRESETS

    if name in BASELINES:
        return BASELINES[name]()
    if name in PRESETS:
        return PRESETS[name].build(calibration)
    raise KeyError(f"unknown codec {name!r}; known: {', '.join(codec_names())}")
