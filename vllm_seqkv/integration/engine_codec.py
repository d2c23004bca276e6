"""The codec of the engine running in this process: preset + the model's calibration."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from vllm_seqkv.calibrate import load_for_model
from vllm_seqkv.codec import make_codec, needs_calibration
from vllm_seqkv.codec.base import KVCodec, SlotLayout
from vllm_seqkv.codec.calibration import Calibration
from vllm_seqkv.config import SeqKVConfig, from_additional_config
from vllm_seqkv.integration.compat import get_current_vllm_config


@dataclass
class CodecStats:
    """Counters exported as metrics (written slots; bytes follow from the layout)."""

    tokens_written: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_write(self, num_slots: int) -> None:
        with self._lock:
            self.tokens_written += num_slots


def build_codec(config: SeqKVConfig, model_dir: Path, num_kv_heads: int,
                head_dim: int) -> SlotLayout:
    """The layer-0 slot layout of ``config.preset`` for this model (all layers share its size)."""
    return EngineCodec(config, str(model_dir), num_kv_heads, head_dim).layout(0)


class EngineCodec:
    def __init__(self, config: SeqKVConfig, model_dir: str, num_kv_heads: int, head_dim: int):
        self.config = config
        self.preset = config.preset
        self.model_dir = model_dir
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        calibration = None
        if needs_calibration(config.preset):
            calibration = (Calibration.load(Path(config.calibration)) if config.calibration
                           else load_for_model(Path(model_dir)))
        self.codec: KVCodec = make_codec(config.preset, calibration)
        self._layouts: dict[int, SlotLayout] = {}
        self.slot_bytes = self.layout(0).slot_bytes
        self.stats = CodecStats()
        self._announced: set[int] = set()

    def layout(self, layer: int) -> SlotLayout:
        if layer not in self._layouts:
            key, value = self.codec.codecs_for_layer(layer)
            self._layouts[layer] = SlotLayout(key, value, self.num_kv_heads, self.head_dim)
        return self._layouts[layer]

    @property
    def bits_per_element(self) -> float:
        return 8 * self.slot_bytes / (2 * self.head_dim)

    @property
    def ratio_vs_bf16(self) -> float:
        return 2 * 2 * self.head_dim / self.slot_bytes

    def announce(self, pid: int) -> bool:
        first = pid not in self._announced
        self._announced.add(pid)
        return first


_active: EngineCodec | None = None


def start_engine_codec(num_kv_heads: int, head_dim: int) -> EngineCodec:
    """Build (once per engine) the codec for the engine whose model is being constructed."""
    global _active
    vllm_config = get_current_vllm_config()
    config = from_additional_config(vllm_config.additional_config)
    model_dir = vllm_config.model_config.model
    key = (config, model_dir, num_kv_heads, head_dim)
    if _active is None or (_active.config, _active.model_dir, _active.num_kv_heads,
                           _active.head_dim) != key:
        _active = EngineCodec(config, model_dir, num_kv_heads, head_dim)
    return _active


def active_engine_codec() -> EngineCodec:
    if _active is None:
        raise RuntimeError("seqkv: no engine codec; the seqkv attention backend was not built")
    return _active
