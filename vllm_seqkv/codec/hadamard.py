"""Randomized Hadamard rotation: fast Walsh-Hadamard transform plus seeded sign flips.

``R = H_d diag(s) / sqrt(d)`` with ``H_d`` the Sylvester Hadamard matrix (``d`` a power of
two) and ``s`` a vector of random signs drawn from a fixed seed. ``R`` is orthogonal, so the
inverse is ``R^T = diag(s) H_d / sqrt(d)``. Applied along the last dimension in
``O(d log d)`` with no matrix materialised.
"""

from __future__ import annotations

import torch

from vllm_seqkv.codec.base import CodecInputError


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform along the last dim: ``[..., d] -> [..., d]``."""
    dim = x.shape[-1]
    if not is_power_of_two(dim):
        raise CodecInputError(
            f"Hadamard transform needs a power-of-two size, got last dimension {dim} "
            "(head_dim must be a power of two for rotation codecs)"
        )
    lead = x.shape[:-1]
    y = x.reshape(-1, dim)
    half = 1
    while half < dim:
        pairs = y.view(-1, dim // (2 * half), 2, half)
        y = torch.cat([pairs[:, :, 0] + pairs[:, :, 1], pairs[:, :, 0] - pairs[:, :, 1]], dim=-1)
        y = y.reshape(-1, dim)
        half *= 2
    return y.reshape(*lead, dim)


def random_signs(dim: int, seed: int) -> torch.Tensor:
    """``[dim]`` float32 vector of +-1 drawn from ``seed`` (independent of global RNG state)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (dim,), generator=gen).float() * 2 - 1


class RandomizedHadamard:
    """Orthogonal rotation ``x -> H diag(s) x / sqrt(d)`` of the last dim of size ``dim``."""

    def __init__(self, dim: int, seed: int = 0):
        if not is_power_of_two(dim):
            raise CodecInputError(
                f"RandomizedHadamard needs a power-of-two dimension, got {dim}"
            )
        self.dim = dim
        self.seed = seed
        self.signs = random_signs(dim, seed)
        self.norm = dim ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., dim] -> [..., dim]`` rotated."""
        return fwht(x * self.signs.to(x.dtype)) * self.norm

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """``[..., dim] -> [..., dim]``; ``inverse(forward(x)) == x`` up to rounding."""
        return fwht(y) * self.norm * self.signs.to(y.dtype)
