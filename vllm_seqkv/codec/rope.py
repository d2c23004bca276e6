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


# --- partial and interleaved rotary: one channel order that makes them full-width neox --------
# A model may rotate only the first ``rotary_dim`` of its ``D`` channels (partial rotary:
# Phi-4-mini, GLM-4, StableLM) and may pair channels ``(2i, 2i+1)`` instead of
# ``(i, i + rotary_dim/2)`` (interleaved / GPT-J style: GLM-4). Reordering the channels of
# queries and keys alike leaves every dot product q.k as it was, so seqkv reorders them where
# they enter (the attention backend, the calibration capture, the ruler) into the one layout
# every codec and kernel pairs: ``(i, i + D/2)``, rotated pairs first, the channels the model
# leaves alone after them, paired with a rotation by angle 0 (cos 1, sin 0).


def channel_order(rotary_dim: int, head_dim: int, is_neox: bool) -> torch.Tensor | None:
    """``order [D]`` (long) such that ``x[..., order]`` pairs channels ``(i, i + D/2)`` as the
    model's rotation pairs them: for ``i < rotary_dim/2`` the model's ``i``-th rotated pair,
    for the rest two channels it leaves alone. None when the model's layout already is that
    (full-width neox). Values are not reordered: only q.k must be invariant."""
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim or head_dim % 2:
        raise ValueError(f"rotary dim {rotary_dim} of head dim {head_dim}: both must be even, "
                         "0 < rotary dim <= head dim")
    if rotary_dim == head_dim and is_neox:
        return None
    pairs = rotary_dim // 2
    rotated = torch.arange(rotary_dim)
    first, second = ((rotated[:pairs], rotated[pairs:]) if is_neox else (rotated[0::2], rotated[1::2]))
    passed = torch.arange(rotary_dim, head_dim)
    half = (head_dim - rotary_dim) // 2
    return torch.cat([first, passed[:half], second, passed[half:]])


def inverse_order(order: torch.Tensor) -> torch.Tensor:
    """The order that undoes ``order``: ``x[..., order][..., inverse_order(order)] == x``."""
    return torch.argsort(order)


def full_width_table(table: torch.Tensor, head_dim: int) -> torch.Tensor:
    """A model's cos/sin table ``[P, rotary_dim]`` as the full-width table ``[P, head_dim]`` of
    the reordered channels (:func:`channel_order`): the unrotated pairs get cos 1, sin 0.
    Raises if the table's rows are scaled (YaRN's mscale) while some channels are not rotated:
    no single magnitude would then describe the table (see :func:`split_table`)."""
    rotary_dim = table.shape[1]
    if rotary_dim == head_dim:
        return table
    cos, sin = table.chunk(2, dim=-1)
    magnitude = (cos.double() ** 2 + sin.double() ** 2).sqrt()
    if float((magnitude - 1).abs().max()) > 1e-3:
        raise ValueError("a scaled RoPE table (e.g. YaRN's mscale) on a partial rotary embedding: "
                         "the rotated and the unrotated channels would need different magnitudes")
    rest = (head_dim - rotary_dim) // 2
    ones = torch.ones(table.shape[0], rest, dtype=table.dtype, device=table.device)
    return torch.cat([cos, ones, sin, torch.zeros_like(ones)], -1).contiguous()
