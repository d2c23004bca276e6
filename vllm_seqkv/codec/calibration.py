"""Per-model calibration of the predictive codec: channel means and error weights.

Fitted once per model from its own activations on calibration text (never the test split)
and stored as a small, versioned, checksummed safetensors file.

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
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_seqkv.codec.predictive import ChannelPredictor

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
        from safetensors.torch import save_file

        tensors = {n: getattr(self, n).contiguous() for n in _TENSORS}
        meta = {"format": FORMAT, "model": self.model, "tokens": str(self.tokens),
                "sha256": _digest(tensors)}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "Calibration":
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise CalibrationError(f"calibration file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {n: f.get_tensor(n) for n in _TENSORS}
        except Exception as exc:  # safetensors raises several types for corrupt headers
            raise CalibrationError(f"calibration file {path} is unreadable: {exc}") from None
        if meta.get("format") != FORMAT:
            raise CalibrationError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        if meta.get("sha256") != _digest(tensors):
            raise CalibrationError(f"{path}: checksum mismatch (corrupt calibration file)")
        return cls(model=meta["model"], tokens=int(meta["tokens"]), **tensors)


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in _TENSORS:
        h.update(name.encode())
        h.update(json.dumps(list(tensors[name].shape)).encode())
        h.update(tensors[name].float().contiguous().numpy().tobytes())
    return h.hexdigest()
