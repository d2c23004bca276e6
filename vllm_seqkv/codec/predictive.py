"""Predictive coding with a calibrated per-channel predictor: only the residual is coded.

The model (what is predicted) is kept apart from the coder (how the residual is coded):

    encode:  r = (x - mean) * weight          [T, H, D]   prediction removed, sensitivity-weighted
             codes = inner.encode(r)                       any per-token TensorCodec (e.g. rotation)
    decode:  x = inner.decode(codes) / weight + mean

``mean`` is the predictor (the per-channel offset that keys carry, see CALIBRATION.md) and
``weight`` shapes the error so that it lands where attention is least sensitive to it
(:mod:`vllm_seqkv.codec.calibration`). Both are per-model constants (``[H, D]`` per layer
and stream, a few hundred KB for a whole model), not per-token data, so they cost no bits
per cached element; the report lists their size separately.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_seqkv.codec.base import CodecInputError, Packed, TensorCodec


@dataclass(frozen=True)
class ChannelPredictor:
    """``mean`` and ``weight``: float32 ``[num_kv_heads, head_dim]``."""

    mean: torch.Tensor
    weight: torch.Tensor

    def __post_init__(self):
        if self.mean.shape != self.weight.shape or self.mean.dim() != 2:
            raise CodecInputError(
                f"predictor mean {tuple(self.mean.shape)} and weight "
                f"{tuple(self.weight.shape)} must both be [num_kv_heads, head_dim]"
            )
        if not (self.weight > 0).all() or not torch.isfinite(self.mean).all():
            raise CodecInputError("predictor weights must be positive and means finite")

    @classmethod
    def identity(cls, num_kv_heads: int, head_dim: int) -> "ChannelPredictor":
        return cls(torch.zeros(num_kv_heads, head_dim), torch.ones(num_kv_heads, head_dim))


class PredictiveCodec(TensorCodec):
    """Residual of a :class:`ChannelPredictor`, coded by ``inner``."""

    def __init__(self, inner: TensorCodec, predictor: ChannelPredictor):
        self.inner = inner
        self.predictor = predictor
        self.block_size = inner.block_size

    def encode(self, x: torch.Tensor) -> Packed:
        self.check_input(x)
        if tuple(x.shape[1:]) != tuple(self.predictor.mean.shape):
            raise CodecInputError(
                f"PredictiveCodec: stream is [T, {x.shape[1]}, {x.shape[2]}] but the predictor "
                f"was calibrated for [T, {self.predictor.mean.shape[0]}, "
                f"{self.predictor.mean.shape[1]}] (wrong model or calibration file?)"
            )
        residual = (x.float() - self.predictor.mean) * self.predictor.weight
        return self.inner.encode(residual)

    def decode(self, packed: Packed) -> torch.Tensor:
        return self.inner.decode(packed).float() / self.predictor.weight + self.predictor.mean

    def bits_per_element(self, num_kv_heads: int, head_dim: int) -> float:
        return self.inner.bits_per_element(num_kv_heads, head_dim)
