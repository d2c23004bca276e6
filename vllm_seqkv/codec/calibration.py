"""Per-model calibration of the seqkv codecs, fitted from the model's own activations.

Fitted once per model from activations on calibration text (never the test split)
(:class:`Capture`) and stored as versioned, checksummed safetensors files:

- :class:`Calibration` (``seqkv-calibration/2``): channel means and error weights of the
  rotation presets (``seqkv-*-rot``), shared by all of them;
- :class:`TransformCalibration` (``seqkv-transform/1``): one per transform preset, the
  closed-loop fit of :func:`fit_transform_calibration` (bases, quantizers, bit allocation
  and cross-layer predictors depend on the preset's bit budget).

Weights of the rotation presets:
Weights: coding the residual ``r = (x - mean) * a`` with a rotation codec spreads the error
evenly over channels in ``r``-space, so channel ``c`` of ``x`` gets error variance
``∝ 1 / a_c**2`` while the residual energy is ``Σ a_c**2 σ_c**2``. The error that matters is
weighted by ``w_c`` (keys: ``E[q_c**2]`` over the query heads of the KV head, since
``q·k`` is what attention reads; values: squared column norms of ``o_proj``). Minimising
``Σ w_c / a_c**2 · Σ a_c**2 σ_c**2`` gives ``a_c ∝ w_c**(1/4) / σ_c**(1/2)`` (Cauchy-Schwarz).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_seqkv.codec.base import TensorCodec
from vllm_seqkv.codec.component_quantizers import one_thread
from vllm_seqkv.codec.crosslayer import CrossLayerCodec, LinearPredictor
from vllm_seqkv.codec.predictive import ChannelPredictor
from vllm_seqkv.codec.token_table import TokenTableCodec
from vllm_seqkv.codec.transform import Transform, TransformCodec, fit_transform

FORMAT = "seqkv-calibration/2"  # /2: key statistics in the pre-RoPE frame
_TENSORS = ("k_mean", "k_weight", "v_mean", "v_weight")


class CalibrationError(ValueError):
    """A missing, corrupt or mismatched calibration file."""


@dataclass
class ChannelMoments:
    """Running first/second moments of one stream: ``[num_layers, num_kv_heads, head_dim]``."""

    total: torch.Tensor
    total_sq: torch.Tensor
    count: int = 0

    @classmethod
    def zeros(cls, num_layers: int, num_kv_heads: int, head_dim: int) -> "ChannelMoments":
        shape = (num_layers, num_kv_heads, head_dim)
        return cls(torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64))

    def add(self, layer: int, x: torch.Tensor) -> None:
        """``x``: ``[T, num_kv_heads, head_dim]`` activations of ``layer``."""
        x = x.detach().double()
        self.total[layer] += x.sum(0)
        self.total_sq[layer] += (x * x).sum(0)
        if layer == 0:
            self.count += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    @property
    def second_moment(self) -> torch.Tensor:
        return self.total_sq / max(self.count, 1)

    @property
    def std(self) -> torch.Tensor:
        return (self.second_moment - self.mean**2).clamp_min(0).sqrt()


@dataclass
class Calibration:
    """Per-layer predictors for K and V; tensors are float32 ``[L, H, D]``."""

    model: str
    tokens: int
    k_mean: torch.Tensor
    k_weight: torch.Tensor
    v_mean: torch.Tensor
    v_weight: torch.Tensor

    @property
    def num_layers(self) -> int:
        return self.k_mean.shape[0]

    def key_predictor(self, layer: int) -> ChannelPredictor:
        return ChannelPredictor(self.k_mean[layer], self.k_weight[layer])

    def value_predictor(self, layer: int) -> ChannelPredictor:
        return ChannelPredictor(self.v_mean[layer], self.v_weight[layer])

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, n).numel() * 4 for n in _TENSORS)

    @classmethod
    def fit(cls, model: str, keys: ChannelMoments, values: ChannelMoments,
            key_sensitivity: torch.Tensor, value_sensitivity: torch.Tensor,
            weighted: bool = True) -> "Calibration":
        """Sensitivities: ``[L, H, D]`` (E[q²] per key channel, ‖W_o column‖² per value channel)."""
        def weight(sensitivity, std):
            if not weighted:
                return torch.ones_like(std)
            a = sensitivity.clamp_min(1e-12) ** 0.25 / std.clamp_min(1e-6) ** 0.5
            return a / a.log().mean(-1, keepdim=True).exp()

        return cls(
            model=model,
            tokens=keys.count,
            k_mean=keys.mean.float(),
            k_weight=weight(key_sensitivity.double(), keys.std).float(),
            v_mean=values.mean.float(),
            v_weight=weight(value_sensitivity.double(), values.std).float(),
        )

    def save(self, path: Path) -> None:
        save_checked(path, {n: getattr(self, n) for n in _TENSORS}, FORMAT,
                     {"model": self.model, "tokens": str(self.tokens)})

    @classmethod
    def load(cls, path: Path) -> "Calibration":
        tensors, meta = load_checked(path, FORMAT)
        missing = set(_TENSORS) - set(tensors)
        if missing:
            raise CalibrationError(f"{path}: missing tensors {sorted(missing)}")
        return cls(model=meta["model"], tokens=int(meta["tokens"]),
                   **{n: tensors[n] for n in _TENSORS})


@dataclass
class Capture:
    """Calibration activations of one model.

    ``keys`` (pre-RoPE) and ``values``: per layer ``[N, H, D]``; ``query_sq [L, H, D]``: E[q²]
    of the pre-RoPE queries averaged over each KV head's query group; ``value_metric
    [L, H, D, D]``: ``Σ_g W_o^{(g)T} W_o^{(g)}`` over the group's query heads.
    ``token_ids [N]``: the captured tokens; ``layer0_table``: pre-RoPE K and V of layer 0
    per vocabulary id ``[vocab, H, D]`` (:mod:`.token_table`), only when verified on the
    captured text (``layer0_check`` says what the verification found).
    """

    model: str
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    query_sq: torch.Tensor
    value_metric: torch.Tensor
    token_ids: torch.Tensor | None = None
    layer0_table: tuple[torch.Tensor, torch.Tensor] | None = None
    layer0_check: str = "not built"

    @property
    def tokens(self) -> int:
        return self.keys[0].shape[0]

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def key_metric(self, layer: int) -> torch.Tensor:
        """``[H, D, D]`` diagonal: E[q²] averaged over each RoPE pair (i, i + D/2), since
        relative rotations mix the two channels of a pair."""
        e = self.query_sq[layer].double()
        half = e.shape[-1] // 2
        pair = (e[:, :half] + e[:, half:]) / 2
        return torch.diag_embed(torch.cat([pair, pair], -1))

    def channel_calibration(self) -> "Calibration":
        heads, dim = self.keys[0].shape[1:]
        keys = ChannelMoments.zeros(self.num_layers, heads, dim)
        values = ChannelMoments.zeros(self.num_layers, heads, dim)
        for layer in range(self.num_layers):
            keys.add(layer, self.keys[layer])
            values.add(layer, self.values[layer])
        value_sensitivity = torch.diagonal(self.value_metric, dim1=-2, dim2=-1)
        return Calibration.fit(self.model, keys, values, self.query_sq, value_sensitivity)


TRANSFORM_FORMAT = "seqkv-transform/2"
_STREAMS = ("k", "v")
_FIELDS = ("mean", "basis", "bits", "levels", "pred_w", "pred_b")
_LAYER0 = ("l0.k", "l0.v")


@dataclass
class TransformCalibration:
    """Fitted tensors of one transform preset: ``"{k,v}.{field}"`` stacked over layers
    (``mean/bits [L, H, D]``, ``basis [L, H, D, D]``, ``levels [L, H, D, 256]``, ``pred_w
    [L, 2HD, HD]``, ``pred_b [L, HD]``; the predictors of layer 0 are unused zeros), and
    with ``layer0_tokens`` the token table of layer 0, ``l0.k`` / ``l0.v`` ``[vocab, H, D]``
    bf16, which then codes layer 0 instead of its transform."""

    model: str
    preset: str
    tokens: int
    cross_layer: bool
    tensors: dict[str, torch.Tensor]
    layer0_check: str = ""

    @property
    def num_layers(self) -> int:
        return self.tensors["k.mean"].shape[0]

    @property
    def layer0_tokens(self) -> bool:
        return _LAYER0[0] in self.tensors

    def codecs(self, layer: int) -> tuple[TensorCodec, TensorCodec]:
        if layer == 0 and self.layer0_tokens:
            return TokenTableCodec(self.tensors["l0.k"]), TokenTableCodec(self.tensors["l0.v"])
        out = []
        for stream in _STREAMS:
            t = {f: self.tensors[f"{stream}.{f}"][layer] for f in _FIELDS}
            transform = Transform.from_padded(t["mean"], t["basis"], t["bits"].long(), t["levels"])
            predictor = (LinearPredictor(t["pred_w"], t["pred_b"])
                         if self.cross_layer and layer > 0 else None)
            out.append(CrossLayerCodec(TransformCodec(transform), predictor))
        return out[0], out[1]

    def save(self, path: Path) -> None:
        save_checked(path, self.tensors, TRANSFORM_FORMAT,
                     {"model": self.model, "preset": self.preset, "tokens": str(self.tokens),
                      "cross_layer": str(int(self.cross_layer)),
                      "layer0_tokens": str(int(self.layer0_tokens)), "layer0_check": self.layer0_check})

    @classmethod
    def load(cls, path: Path, preset: str | None = None) -> "TransformCalibration":
        tensors, meta = load_checked(path, TRANSFORM_FORMAT)
        missing = {f"{s}.{f}" for s in _STREAMS for f in _FIELDS} - set(tensors)
        if meta.get("layer0_tokens") == "1":
            missing |= set(_LAYER0) - set(tensors)
        if missing:
            raise CalibrationError(f"{path}: missing tensors {sorted(missing)}")
        if preset is not None and meta.get("preset") != preset:
            raise CalibrationError(f"{path} was fitted for preset {meta.get('preset')!r}, not {preset!r}")
        return cls(meta["model"], meta["preset"], int(meta["tokens"]), meta["cross_layer"] == "1", tensors,
                   meta.get("layer0_check", ""))


FIT_WORKERS = 4  # at most this many streams fitted at once (each holds its samples in float64)


def fit_transform_calibration(capture: Capture, preset: str, key_bits: float, value_bits: float,
                              cross_layer: bool = True, layer0_tokens: bool = True,
                              key_rope_pairs: bool = False, progress=None) -> TransformCalibration:
    """Closed-loop fit, layer by layer: the predictor of layer ``l`` is fitted on the
    reconstruction of layer ``l - 1`` by its own fitted codec (what the decoder will have),
    and the transform of layer ``l`` on the residual of that prediction. With
    ``layer0_tokens`` and a verified ``capture.layer0_table``, layer 0 is coded by its token
    table (its reconstruction: the bf16 table rows; its transform is fitted but unused).

    Streams are fitted in parallel, one thread each (torch's thread count worth of workers,
    at most :data:`FIT_WORKERS`; each op single-threaded, see
    :func:`.component_quantizers.one_thread`): every layer's K and V at once without
    cross-layer prediction, a layer's K and V at once with it. Every op is the same as in a
    serial fit, so the tensors are identical."""
    table = capture.layer0_table if layer0_tokens else None
    extra: dict[str, torch.Tensor] = {}
    if table is not None:
        extra = {name: t.to(torch.bfloat16).contiguous() for name, t in zip(_LAYER0, table)}
    settings = {"k": (key_bits, key_rope_pairs), "v": (value_bits, False)}
    workers = max(1, min(torch.get_num_threads(), FIT_WORKERS))

    def fit(layer: int, stream: str, previous):
        x = (capture.keys if stream == "k" else capture.values)[layer]
        metric = capture.key_metric(layer) if stream == "k" else capture.value_metric[layer]
        return _fit_stream(x, metric, *settings[stream], previous, cross_layer)

    results: dict[tuple[int, str], tuple] = {}
    with one_thread(), ThreadPoolExecutor(workers) as pool:
        if not cross_layer:  # layers independent: all at once, reported as they complete in order
            futures = {(layer, s): pool.submit(fit, layer, s, None)
                       for layer in range(capture.num_layers) for s in _STREAMS}
        previous = None
        for layer in range(capture.num_layers):
            if progress is not None:
                progress(layer, capture.num_layers)
            if cross_layer:
                futures = {(layer, s): pool.submit(fit, layer, s, previous) for s in _STREAMS}
            for s in _STREAMS:
                results[(layer, s)] = futures[(layer, s)].result()
            if cross_layer:
                previous = tuple(results[(layer, s)][2] for s in _STREAMS)
                if layer == 0 and table is not None:
                    previous = tuple(extra[n][capture.token_ids].float() for n in _LAYER0)
    tensors = {f"{s}.{name}": torch.stack([results[(layer, s)][i][name] for layer in range(capture.num_layers)])
               for s in _STREAMS for i, names in ((0, _FIELDS[:4]), (1, _FIELDS[4:])) for name in names}
    return TransformCalibration(capture.model, preset, capture.tokens, cross_layer, tensors | extra,
                                capture.layer0_check if layer0_tokens else "not used by the preset")


def _fit_stream(x: torch.Tensor, metric: torch.Tensor, bits: float, rope_pairs: bool, previous,
                cross_layer: bool) -> tuple[dict, dict, torch.Tensor | None]:
    """One layer's K or V ``x [N, H, D]``: the transform's tensors (mean, basis, bits, levels),
    the predictor's (pred_w, pred_b) and, with ``cross_layer``, the reconstruction the layer
    above is predicted from (else None)."""
    x = x.float()
    heads, dim = x.shape[1:]
    if cross_layer and previous is not None:
        predictor = LinearPredictor.fit(previous, x)
        prediction = predictor.predict(previous, heads, dim)
    else:
        predictor = LinearPredictor(torch.zeros(2 * heads * dim, heads * dim), torch.zeros(heads * dim))
        prediction = torch.zeros_like(x)
    transform = fit_transform(x - prediction, metric, bits, rope_pairs=rope_pairs)
    recon = None
    if cross_layer:  # only the predictor of the layer above reads the reconstruction
        codec = TransformCodec(transform)
        recon = codec.decode(codec.encode(x - prediction)) + prediction
    fields = {"mean": transform.mean, "basis": transform.basis, "bits": transform.bits.to(torch.int32),
              "levels": transform.padded_levels()}  # the file keeps the padded [H, D, 256] form
    return fields, {"pred_w": predictor.weight, "pred_b": predictor.bias}, recon


def save_checked(path: Path, tensors: dict[str, torch.Tensor], fmt: str, meta: dict[str, str]) -> None:
    """Atomic write of a checksummed safetensors file."""
    from safetensors.torch import save_file

    tensors = {n: t.contiguous() for n, t in tensors.items()}
    meta = {**meta, "format": fmt, "sha256": _digest(tensors)}
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except OSError as exc:  # a full disk, a read-only cache: nothing half-written is left
        tmp.unlink(missing_ok=True)
        raise CalibrationError(f"cannot write calibration file {path}: {exc}") from None


def load_checked(path: Path, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise CalibrationError(f"calibration file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {n: f.get_tensor(n) for n in f.keys()}
    except Exception as exc:  # safetensors raises several types for corrupt headers
        raise CalibrationError(f"calibration file {path} is unreadable: {exc}") from None
    if meta.get("format") != fmt:
        raise CalibrationError(f"{path}: format {meta.get('format')!r}, expected {fmt!r}")
    if meta.get("sha256") != _digest(tensors):
        raise CalibrationError(f"{path}: checksum mismatch (corrupt calibration file)")
    return tensors, meta


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(json.dumps(list(tensors[name].shape)).encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
