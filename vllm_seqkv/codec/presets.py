"""Named seqkv codec presets: the hot-tier codec the vLLM backend stores pages with.

Main presets (``seqkv-2``, ``-2.5``, ``-3``, ``-4``; the number is bits per element in the
pages, every field counted): keys in the pre-RoPE frame, each layer's K/V predicted from the
reconstructed K/V of the layer below (:mod:`.crosslayer`), the residual coded by a calibrated
transform coder (:mod:`.transform`: decorrelating basis in the attention-weighted space,
per-component Lloyd-Max quantizers, bits by reverse water-filling). Values get one bit more
than keys (``seqkv-3``: K 2.5 / V 3.5; K 3 / V 3 and K 2 / V 4 measured no better on the
validation split). The first token of every sequence (the attention sink) stays exact
(its 16 bits per element are counted over the context). Layer 0 is stored as the token's
row in a table of its K/V (:mod:`.token_table`), exact, when the calibration verified that
the model's layer 0 depends on the token id alone; its slot is padded to the others'
(pages are uniform), so it is counted at the same bits. Every preset is per-token
(``block_size`` 1), so vLLM writes each token's slot as it arrives.

Fusable presets (``seqkv-f2.5``, ``-f3``, ``-f3.5``, ``-f4``): what attention can read straight
from the page bytes (the design card's rule 3a). No cross-layer prediction (each layer decodes
from its own slots), layer 0 transform-coded like the others (a token-table row per token
would be a 16-bit read per element), and the key basis restricted to the two channels of each
RoPE pair, so that it commutes with RoPE: a kernel scores a cached key in ``O(D)`` (rotate each
pair's 2-vector by the position) instead of rebuilding it with a ``D x D`` product; the value
basis stays full (values are summed in the coded space and rotated back once per query).

Ablations keep the bits and drop one idea each: ``seqkv-3-nox`` (no cross-layer prediction:
every layer decodes on its own, what a fused GPU kernel reads), ``seqkv-3-nol0`` (layer 0
transform-coded like the others instead of its token table), ``seqkv-3-nosink`` (same
codes as ``seqkv-3``, first token not kept exact), and the first design, ``seqkv-3-rot`` (calibrated channel mean +
sensitivity weights, random Hadamard rotation, Lloyd-Max codes with an fp16 norm per
token-head) with ``seqkv-3-rot-none`` (the same rotation code without calibration).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vllm_seqkv.codec.base import KVCodec
from vllm_seqkv.codec.baselines import TurboCodec
from vllm_seqkv.codec.calibration import (
    Calibration,
    Capture,
    TransformCalibration,
    fit_transform_calibration,
)
from vllm_seqkv.codec.predictive import PredictiveCodec

AnyCalibration = Calibration | TransformCalibration


@dataclass(frozen=True)
class TransformPreset:
    name: str
    key_bits: float
    value_bits: float
    cross_layer: bool = True
    layer0_tokens: bool = True
    sink_tokens: int = 1
    fitted_as: str = ""  # another preset whose calibration this one uses (same codes)
    key_rope_pairs: bool = False  # key basis mixes only RoPE pairs (O(D) fused scoring)
    calibration_kind: Literal["transform"] = "transform"

    @property
    def calibration_name(self) -> str:
        return self.fitted_as or self.name

    def fit(self, capture: Capture, progress=None) -> TransformCalibration:
        """``progress(layer, num_layers)``: called before each layer's fit."""
        return fit_transform_calibration(capture, self.calibration_name, self.key_bits,
                                         self.value_bits, self.cross_layer, self.layer0_tokens,
                                         self.key_rope_pairs, progress)

    @property
    def fusable(self) -> bool:
        """Decode reads only the layer's own slots and fixed tables: no layer below (no
        cross-layer chain), no token-table row per token (layer 0 coded like the others),
        and a key basis that commutes with RoPE (scored per pair in the kernel)."""
        return not self.cross_layer and not self.layer0_tokens and self.key_rope_pairs

    def build(self, calibration: AnyCalibration | None) -> KVCodec:
        if not isinstance(calibration, TransformCalibration) or calibration.preset != self.calibration_name:
            raise ValueError(
                f"preset {self.name!r} needs its own calibration for this model "
                f"(python -m vllm_seqkv.calibrate MODEL_DIR --preset {self.calibration_name})")
        codec = KVCodec(name=self.name, key=None, value=None, pre_rope_keys=True,
                        sink_tokens=self.sink_tokens, cross_layer=self.cross_layer)
        for layer in range(calibration.num_layers):
            codec.per_layer[layer] = calibration.codecs(layer)
        codec.key, codec.value = codec.per_layer[calibration.num_layers - 1]
        return codec


@dataclass(frozen=True)
class RotationPreset:
    name: str
    key_split: tuple[int, int]
    value_split: tuple[int, int]
    calibrated: bool = True
    sink_tokens: int = 1
    calibration_kind: Literal["channel", "none"] = "channel"

    def fit(self, capture: Capture, progress=None) -> Calibration:
        return capture.channel_calibration()

    def build(self, calibration: AnyCalibration | None) -> KVCodec:
        codec = KVCodec(name=self.name, key=TurboCodec(self.key_split),
                        value=TurboCodec(self.value_split),
                        pre_rope_keys=self.calibrated, sink_tokens=self.sink_tokens)
        if not self.calibrated:
            return codec
        if not isinstance(calibration, Calibration):
            raise ValueError(f"preset {self.name!r} needs the model's channel calibration "
                             "(python -m vllm_seqkv.calibrate MODEL_DIR)")
        for layer in range(calibration.num_layers):
            codec.per_layer[layer] = (
                PredictiveCodec(TurboCodec(self.key_split), calibration.key_predictor(layer)),
                PredictiveCodec(TurboCodec(self.value_split), calibration.value_predictor(layer)))
        return codec


Preset = TransformPreset | RotationPreset

_MAIN = [
    TransformPreset("seqkv-2", 1.5, 2.5),
    TransformPreset("seqkv-2.5", 2.0, 3.0),
    TransformPreset("seqkv-3", 2.5, 3.5),
    TransformPreset("seqkv-4", 3.5, 4.5),
]
# Fusable presets (seqkv-f*): decode at layer l reads only layer l's own slots (see ``fusable``).
_FUSABLE = [
    TransformPreset("seqkv-f2.5", 2.0, 3.0, cross_layer=False, layer0_tokens=False, key_rope_pairs=True),
    TransformPreset("seqkv-f3", 2.5, 3.5, cross_layer=False, layer0_tokens=False, key_rope_pairs=True),
    TransformPreset("seqkv-f3.5", 3.0, 4.0, cross_layer=False, layer0_tokens=False, key_rope_pairs=True),
    TransformPreset("seqkv-f4", 3.5, 4.5, cross_layer=False, layer0_tokens=False, key_rope_pairs=True),
]
_ABLATIONS = [
    TransformPreset("seqkv-3-nox", 2.5, 3.5, cross_layer=False),
    TransformPreset("seqkv-3-nol0", 2.5, 3.5, layer0_tokens=False),
    TransformPreset("seqkv-3-nosink", 2.5, 3.5, sink_tokens=0, fitted_as="seqkv-3"),
    RotationPreset("seqkv-3-rot", (3, 3), (3, 2)),
    RotationPreset("seqkv-3-rot-none", (3, 3), (3, 2), calibrated=False, sink_tokens=0,
                   calibration_kind="none"),
]

PRESETS: dict[str, Preset] = {p.name: p for p in _MAIN + _FUSABLE + _ABLATIONS}
from vllm_seqkv.config import DEFAULT_PRESET  # noqa: E402,F401  (re-exported)
