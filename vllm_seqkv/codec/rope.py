"""Rotary position embedding (default, unscaled; HF rotate-half layout) and its inverse.

Keys are cached post-RoPE, but their channel structure (a fixed per-channel offset) lives in
the pre-RoPE frame; codecs with ``KVCodec.pre_rope_keys`` code keys there.
"""

from __future__ import annotations

import torch


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of shape ``[T, head_dim]`` for ``positions [T]``."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64,
                                           device=positions.device) / head_dim)
    angles = positions.double()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [T, H, D]`` rotated by position: ``x cos + rotate_half(x) sin``."""
    return x * cos[:, None, :] + _rotate_half(x) * sin[:, None, :]


def unapply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`apply_rope`: ``x cos - rotate_half(x) sin``."""
    return x * cos[:, None, :] - _rotate_half(x) * sin[:, None, :]


def rope_theta(hf_config) -> float | None:
    """RoPE base of a transformers config (``rope_theta`` or inside ``rope_parameters``)."""
    rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    theta = getattr(hf_config, "rope_theta", None) or rope.get("rope_theta")
    return float(theta) if theta is not None else None
