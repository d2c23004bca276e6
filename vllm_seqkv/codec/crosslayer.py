"""Cross-layer prediction: each layer's K/V predicted from the layer below, residual coded.

The residual stream changes little from one layer to the next, so the K/V of layer ``l``
are largely a linear function of those of layer ``l - 1`` for the same token (how much of
the variance a ridge regression explains is measured by ``python -m benchmarks entropy``).
Closed loop, as in DPCM: the prediction
reads the *reconstructed* K/V of the layer below, which the decoder has too, so errors do
not accumulate up the layers::

    encode:  r = x - (prev @ weight + bias)      prev = [K̂_{l-1}, V̂_{l-1}] flattened [T, 2HD]
             codes = inner.encode(r)
    decode:  x̂ = inner.decode(codes) + prev @ weight + bias

``weight [2HD, HD]`` / ``bias [HD]`` are per-model constants fitted on calibration text with
the reconstructions of the calibrated codec below (closed-loop fit). Layer 0 has no layer
below and is coded on its own. Reading layer ``l`` therefore needs the reconstruction of
every layer below it for the same positions: the vLLM backend reconstructs layers in order
within a forward pass and hands each one to the next.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_seqkv.codec.base import CodecInputError, Packed, TensorCodec

Previous = tuple[torch.Tensor, torch.Tensor]  # reconstructed (key, value) of the layer below, [T, H, D]


@dataclass(frozen=True)
class LinearPredictor:
    """``weight [2 * H * D, H * D]``, ``bias [H * D]`` (float32)."""

    weight: torch.Tensor
    bias: torch.Tensor

    def predict(self, previous: Previous, heads: int, dim: int) -> torch.Tensor:
        key, value = previous
        tokens = key.shape[0]
        features = torch.cat([key.reshape(tokens, -1), value.reshape(tokens, -1)], -1).float()
        if features.shape[1] != self.weight.shape[0]:
            raise CodecInputError(
                f"cross-layer predictor expects {self.weight.shape[0]} features per token, "
                f"got {features.shape[1]}")
        return (features @ self.weight + self.bias).view(tokens, heads, dim)

    @classmethod
    def fit(cls, previous: Previous, target: torch.Tensor,
            ridges: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)) -> "LinearPredictor":
        """Ridge regression of ``target [N, H, D]`` on the reconstructed layer below.

        The ridge strength is chosen on the last fifth of the samples (held out); if no
        strength predicts the held-out part better than its mean, the predictor is zero
        (the layer is then coded on its own), so small calibration sets cannot make it worse.
        """
        key, value = previous
        n = target.shape[0]
        x = torch.cat([key.reshape(n, -1), value.reshape(n, -1)], -1).double()
        y = target.reshape(n, -1).double()
        split = n - n // 5
        train = _Moments(x[:split], y[:split])
        best, best_err = None, float((y[split:] - y[:split].mean(0)).pow(2).sum())
        for ridge in ridges:
            weight, bias = train.solve(ridge)
            err = float((y[split:] - x[split:] @ weight - bias).pow(2).sum())
            if err < best_err:
                best, best_err = ridge, err
        if best is None:
            return cls(torch.zeros(x.shape[1], y.shape[1]), torch.zeros(y.shape[1]))
        weight, bias = _Moments(x, y).solve(best)
        return cls(weight.float(), bias.float())


class _Moments:
    """Centred second moments of a regression, computed once for every ridge strength."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x_mean, self.y_mean = x.mean(0), y.mean(0)
        a = x - self.x_mean
        self.gram, self.cross = a.T @ a, a.T @ (y - self.y_mean)

    def solve(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
        dim = self.gram.shape[0]
        reg = ridge * torch.diagonal(self.gram).sum() / dim
        weight = torch.linalg.solve(self.gram + reg * torch.eye(dim, dtype=self.gram.dtype), self.cross)
        return weight, self.y_mean - self.x_mean @ weight


class CrossLayerCodec(TensorCodec):
    """``inner`` codes the residual of ``predictor`` (``None``: layer 0, no prediction)."""

    def __init__(self, inner: TensorCodec, predictor: LinearPredictor | None):
        self.inner = inner
        self.predictor = predictor
        self.block_size = inner.block_size
        self.takes_previous = predictor is not None

    def prediction(self, x_shape, previous: Previous | None) -> torch.Tensor | float:
        if self.predictor is None:
            return 0.0
        if previous is None:
            raise CodecInputError("this layer is predicted from the layer below: pass previous=")
        if previous[0].shape[0] != x_shape[0]:
            raise CodecInputError(
                f"previous layer has {previous[0].shape[0]} tokens, this one {x_shape[0]}")
        return self.predictor.predict(previous, x_shape[1], x_shape[2])

    def encode(self, x: torch.Tensor, previous: Previous | None = None) -> Packed:
        self.check_input(x)
        return self.inner.encode(x.float() - self.prediction(x.shape, previous))

    def decode(self, packed: Packed, previous: Previous | None = None) -> torch.Tensor:
        return self.inner.decode(packed).float() + self.prediction(packed.shape, previous)

    def bits_per_element(self, num_kv_heads: int, head_dim: int) -> float:
        return self.inner.bits_per_element(num_kv_heads, head_dim)

    @property
    def needs_dense_layer_below(self) -> bool:
        return self.predictor is not None

    def read_bits_per_element(self, num_kv_heads: int, head_dim: int) -> float:
        """Its own code, plus (with a predictor) the layer below's K and V reconstruction in
        float32 that the prediction reads: ``weight`` maps ``2HD`` features to each of ``HD``
        outputs, so per element of this stream 2 x 32 bits are read."""
        own = self.inner.read_bits_per_element(num_kv_heads, head_dim)
        return own + (2 * 32.0 if self.predictor is not None else 0.0)
