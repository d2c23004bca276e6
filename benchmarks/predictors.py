"""Predictors of a KV stream and the residual symbols they leave at a fixed quantizer step.

A stream is ``x [W, T, L, H, D]`` (windows, positions, layers, kv heads, head dim) and a step
``step [L, H, D]`` (one uniform step per channel). Every predictor returns
:class:`Residuals`: integer symbols ``[W, T, L, H, D]`` (the residual ``x - prediction``
divided by the step and rounded), a bool mask of which symbols are paid for, the
reconstruction ``x_hat``, the unquantized residual (for variance ratios) and side bits per
element (e.g. int8 anchors). Closed-loop predictors predict from reconstructed values only,
as a decoder would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Residuals:
    symbols: torch.Tensor  # int64 [W, T, L, H, D]
    paid: torch.Tensor  # bool [W, T] positions whose symbols are entropy-coded
    reconstruction: torch.Tensor  # [W, T, L, H, D]
    residual: torch.Tensor  # [W, T, L, H, D], x - prediction before quantization
    side_bits_per_element: float = 0.0  # anchors etc., averaged over all positions


def quantize(residual: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    return torch.round(residual / step).long()


def _all_paid(x: torch.Tensor) -> torch.Tensor:
    return torch.ones(x.shape[:2], dtype=torch.bool)


def no_prediction(x: torch.Tensor, step: torch.Tensor) -> Residuals:
    """Raw stream on the step grid (prediction 0)."""
    symbols = quantize(x, step)
    return Residuals(symbols, _all_paid(x), symbols * step, x)


def channel_mean(x: torch.Tensor, step: torch.Tensor, mean: torch.Tensor) -> Residuals:
    """Prediction = per-channel mean ``[L, H, D]`` from the calibration text."""
    residual = x - mean
    symbols = quantize(residual, step)
    return Residuals(symbols, _all_paid(x), mean + symbols * step, residual)


def previous_token(x: torch.Tensor, step: torch.Tensor) -> Residuals:
    """Closed-loop DPCM along positions: prediction = reconstruction of the previous token
    (the first token of a window is coded raw)."""
    recon = torch.empty_like(x)
    symbols = torch.empty(x.shape, dtype=torch.long)
    residual = torch.empty_like(x)
    previous = torch.zeros_like(x[:, 0])
    for t in range(x.shape[1]):
        residual[:, t] = x[:, t] - previous
        symbols[:, t] = quantize(residual[:, t], step)
        recon[:, t] = previous + symbols[:, t] * step
        previous = recon[:, t]
    return Residuals(symbols, _all_paid(x), recon, residual)


def int8_per_vector(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 with an fp16 scale per head vector (last dim): the anchors' code."""
    scale = (x.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-8).half().float()
    return torch.round(x / scale).clamp(-127, 127) * scale


def block_anchor(x: torch.Tensor, step: torch.Tensor, block: int) -> Residuals:
    """First token of each ``block``-token block stored as int8 (+fp16 scale per head
    vector); the others coded as residuals from that anchor's reconstruction."""
    positions = torch.arange(x.shape[1])
    anchors = int8_per_vector(x[:, ::block])  # [W, ceil(T/block), L, H, D]
    prediction = anchors[:, positions // block]
    is_anchor = (positions % block == 0)[None, :].expand(x.shape[0], -1)
    residual = x - prediction
    symbols = quantize(residual, step)
    recon = torch.where(is_anchor[..., None, None, None], prediction, prediction + symbols * step)
    head_dim = x.shape[-1]
    side = (8 + 16 / head_dim) / block
    return Residuals(symbols, ~is_anchor, recon, torch.where(is_anchor[..., None, None, None], 0.0, residual), side)


def fit_cross_layer(inputs: torch.Tensor, targets: torch.Tensor, ridge: float = 1e-4) -> list[torch.Tensor]:
    """Least-squares maps from layer ``l-1`` to layer ``l`` of the same token.

    ``inputs, targets [N, L, F_in/F_out]`` (flattened heads/channels of the calibration text).
    Returns for each ``l >= 1`` a matrix ``[F_in + 1, F_out]`` (last row: bias); entry 0 is empty.
    """
    maps = [torch.empty(0)]
    for layer in range(1, inputs.shape[1]):
        design = torch.cat([inputs[:, layer - 1].double(), torch.ones(inputs.shape[0], 1, dtype=torch.float64)], 1)
        gram = design.T @ design
        gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=torch.float64)
        maps.append(torch.linalg.solve(gram, design.T @ targets[:, layer].double()).float())
    return maps


def cross_layer(x: torch.Tensor, step: torch.Tensor, maps: list[torch.Tensor],
                layer0: torch.Tensor | None = None) -> Residuals:
    """Closed loop over layers: layer ``l`` predicted by ``maps[l]`` from the reconstruction of
    layer ``l-1`` (all heads, K and V together: ``x`` stacks them on the head axis).

    Layer 0 is coded raw, or taken as given (``layer0``, e.g. looked up from the token id:
    0 bits, symbols forced to 0).
    """
    windows, length, layers, heads, dim = x.shape
    flat = x.reshape(windows * length, layers, heads * dim)
    flat_step = step.reshape(layers, heads * dim)
    recon = torch.empty_like(flat)
    residual = torch.empty_like(flat)
    if layer0 is None:
        residual[:, 0] = flat[:, 0]
        recon[:, 0] = quantize(flat[:, 0], flat_step[0]) * flat_step[0]
    else:
        recon[:, 0] = layer0.reshape(windows * length, heads * dim)
        residual[:, 0] = flat[:, 0] - recon[:, 0]
    for layer in range(1, layers):
        weights = maps[layer]
        prediction = recon[:, layer - 1] @ weights[:-1] + weights[-1]
        residual[:, layer] = flat[:, layer] - prediction
        recon[:, layer] = prediction + quantize(residual[:, layer], flat_step[layer]) * flat_step[layer]
    symbols = quantize(residual, flat_step)
    if layer0 is not None:
        symbols[:, 0] = 0
    shape = x.shape
    return Residuals(symbols.reshape(shape), _all_paid(x), recon.reshape(shape), residual.reshape(shape))
