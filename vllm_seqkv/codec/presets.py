"""Named seqkv codec presets: the hot-tier codec the vLLM backend stores pages with.

A preset = a calibrated per-channel predictor (:mod:`.predictive`) whose residual is coded by
a rotation + Lloyd-Max scalar code (:class:`~.baselines.TurboCodec`) with more bits for keys
than for values (keys are the bottleneck on our model, see CALIBRATION.md). Every preset is
per-token (``block_size`` 1), so vLLM writes each token's slot as it arrives and no exact
staging buffer is needed; bits/element = mean of key and value bits (codes + fp16 norm).

The first token of every sequence (the attention sink) stays exact (``sink_tokens``; its
16 bits per element are counted over the context). Keys are coded in the pre-RoPE frame, where their per-channel offset is fixed (post-RoPE it
turns with the position, and a post-RoPE mean predictor measured worse than none).
Ablations keep the same bits with a weaker predictor: ``-mean`` (channel means, no error
weighting) and ``-none`` (no predictor, post-RoPE: plain rotation code at the preset's split),
``-nosink``, and ``-k4v2`` (the same 3 bits spent 3.5 on keys / 2 on values: worse, values
at 2 bits cost more than keys at 3 once keys are predicted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from vllm_seqkv.codec.base import KVCodec
from vllm_seqkv.codec.baselines import TurboCodec
from vllm_seqkv.codec.calibration import Calibration
from vllm_seqkv.codec.predictive import ChannelPredictor, PredictiveCodec

Predictor = Literal["calibrated", "mean", "none"]


@dataclass(frozen=True)
class Preset:
    name: str
    key_split: tuple[int, int]
    value_split: tuple[int, int]
    predictor: Predictor = "calibrated"
    sink_tokens: int = 1

    def build(self, calibration: Calibration | None) -> KVCodec:
        if self.predictor != "none" and calibration is None:
            raise ValueError(
                f"preset {self.name!r} needs the model's calibration "
                "(python -m vllm_seqkv.calibrate MODEL_DIR)"
            )
        codec = KVCodec(name=self.name, key=TurboCodec(self.key_split),
                        value=TurboCodec(self.value_split),
                        pre_rope_keys=self.predictor != "none", sink_tokens=self.sink_tokens)
        if self.predictor == "none":
            return codec
        for layer in range(calibration.num_layers):
            k_pred, v_pred = calibration.key_predictor(layer), calibration.value_predictor(layer)
            if self.predictor == "mean":
                k_pred = ChannelPredictor(k_pred.mean, k_pred.weight.new_ones(k_pred.weight.shape))
                v_pred = ChannelPredictor(v_pred.mean, v_pred.weight.new_ones(v_pred.weight.shape))
            codec.per_layer[layer] = (PredictiveCodec(TurboCodec(self.key_split), k_pred),
                                      PredictiveCodec(TurboCodec(self.value_split), v_pred))
        return codec


_MAIN = [
    Preset("seqkv-2.5", (3, 2), (2, 2)),
    Preset("seqkv-3", (3, 3), (3, 2)),
    Preset("seqkv-3.5", (4, 4), (3, 2)),
    Preset("seqkv-4", (4, 4), (4, 3)),
]
_ABLATIONS = [
    *(Preset(f"seqkv-3-{mode}", (3, 3), (3, 2), mode, sink_tokens=0) for mode in ("mean", "none")),
    Preset("seqkv-3-nosink", (3, 3), (3, 2), sink_tokens=0),
    Preset("seqkv-3-k4v2", (4, 3), (2, 2)),
]

PRESETS: dict[str, Callable[[Calibration | None], KVCodec]] = {
    p.name: p.build for p in _MAIN + _ABLATIONS
}
