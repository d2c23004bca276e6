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


# --- RoPE given as data: a cos/sin table per position ---------------------------------------
# The integration layer reads the table from the serving engine's own rotary embedding (any
# variant whose rotation depends on the position only: default, linear, llama3, YaRN, ...),
# so this module never re-implements a variant. Layout: float ``[P, D]``, row ``p`` = cos of
# the ``D/2`` frequencies at position ``p``, then their sin (vLLM's ``cos_sin_cache`` and
# :func:`vllm_seqkv.kernels.rope_cache`), pairs ``(i, i + D/2)`` (rotate-half / neox layout).
# A variant may scale cos and sin alike (YaRN's mscale): row magnitudes ``cos² + sin²`` need
# not be 1, and the inverse divides by them.


def table_rows(table: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin [T, D]`` (halves repeated, as :func:`apply_rope` takes them) of ``table [P, D]``
    at ``positions [T]``; raises if a position is past the table."""
    positions = positions.long()
    if positions.numel() and int(positions.max()) >= table.shape[0]:
        raise ValueError(f"RoPE table has {table.shape[0]} positions; position "
                         f"{int(positions.max())} was asked for")
    rows = table[positions.to(table.device)].to(positions.device)
    cos, sin = rows.chunk(2, dim=-1)
    return torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)


def rotate_by_table(x: torch.Tensor, table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``x [T, H, D]`` (pre-RoPE) rotated as the table's model does at ``positions [T]``."""
    cos, sin = table_rows(table, positions)
    return apply_rope(x, cos.to(x.dtype), sin.to(x.dtype))


def unrotate_by_table(x: torch.Tensor, table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`rotate_by_table`: the transposed rotation over ``cos² + sin²``."""
    cos, sin = table_rows(table, positions)
    norm = cos * cos + sin * sin
    return unapply_rope(x, (cos / norm).to(x.dtype), (sin / norm).to(x.dtype))


def split_table(table: torch.Tensor, tolerance: float = 1e-3) -> tuple[torch.Tensor, float]:
    """``(rotation, magnitude)``: the table as pure rotations (``cos² + sin² = 1``) and the one
    magnitude every row shares (1 for most variants, YaRN's mscale for YaRN), so that
    ``table = magnitude * rotation``. Kernels that compose rotations (``R(a + b) = R(a) R(b)``)
    take the rotation and fold the magnitude into the attention scale. Raises if the
    magnitudes differ by more than ``tolerance`` (relative): such a table is not one scaled
    rotation."""
    cos, sin = table.double().chunk(2, dim=-1)
    magnitude = (cos * cos + sin * sin).sqrt()
    mean = float(magnitude.mean())
    if float((magnitude - mean).abs().max()) > tolerance * mean:
        raise ValueError("RoPE table rows have different magnitudes: not a scaled rotation")
    rotation = torch.cat([cos / magnitude, sin / magnitude], -1).float().contiguous()
    return rotation, mean


def default_table(max_positions: int, head_dim: int, theta: float) -> torch.Tensor:
    """Default RoPE as a table ``[max_positions, head_dim]`` (float64 angles), for callers that
    have no engine (the ruler, offline benchmarks)."""
    cos, sin = rope_tables(torch.arange(max_positions), head_dim, theta)
    half = head_dim // 2
    return torch.cat([cos[:, :half], sin[:, :half]], -1).contiguous()
