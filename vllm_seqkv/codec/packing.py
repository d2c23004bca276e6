"""Bit packing of small integer codes into uint8 tensors (pure torch, vectorised).

Codes of ``bits`` bits (1..8) are laid out little-endian in a flat bit stream: code ``i``
occupies bits ``[i*bits, (i+1)*bits)`` of the stream, bit 0 of a byte first. The stream is
padded with zero bits to a whole byte, so ``count`` codes take ``ceil(count*bits/8)`` bytes.
Every ``pack_bits`` has its inverse ``unpack_bits``; the byte layout is part of the format.
"""

from __future__ import annotations

import math

import torch

_BYTE_SHIFTS = torch.arange(8, dtype=torch.uint8)


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes taken by ``count`` codes of ``bits`` bits."""
    _check_bits(bits)
    return math.ceil(count * bits / 8)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer ``codes`` (any shape, values in ``[0, 2**bits)``) into uint8 ``[nbytes]``.

    Raises ``ValueError`` when a code does not fit in ``bits`` bits.
    """
    _check_bits(bits)
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(
            f"pack_bits: codes must lie in [0, {1 << bits}) for {bits} bits, "
            f"got range [{int(flat.min())}, {int(flat.max())}]"
        )
    flat = flat.to(torch.uint8)
    if bits == 8:
        return flat.clone()
    shifts = torch.arange(bits, dtype=torch.uint8)
    stream = ((flat.unsqueeze(-1) >> shifts) & 1).reshape(-1)  # [count*bits] bit stream
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    return (stream.view(-1, 8) << _BYTE_SHIFTS).sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``[nbytes]`` -> uint8 codes ``[count]``."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"unpack_bits: expected a 1-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.numel() != packed_nbytes(count, bits):
        raise ValueError(
            f"unpack_bits: {count} codes of {bits} bits take {packed_nbytes(count, bits)} bytes, "
            f"got {packed.numel()}"
        )
    if bits == 8:
        return packed.clone()
    stream = ((packed.unsqueeze(-1) >> _BYTE_SHIFTS) & 1).reshape(-1)[: count * bits]
    weights = torch.arange(bits, dtype=torch.uint8)
    return (stream.view(count, bits) << weights).sum(-1, dtype=torch.int32).to(torch.uint8)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")
