"""Peer baselines, re-implemented from their papers (facts carry over, code does not).

Every stream is ``[num_tokens, num_kv_heads, head_dim]`` (K or V of one layer, keys
post-RoPE as a paged cache stores them). Codes are really bit-packed
(:mod:`vllm_seqkv.codec.packing`), so ``Packed.nbytes`` is the true size and
``bits_per_element`` equals ``8 * nbytes / numel``.

- ``bf16``: bfloat16 copy (the uncompressed cache of a bf16 model);
- ``fp8-e4m3`` (arXiv 2209.05433, FP8 formats): e4m3 values, one fp32 amax scale per
  16-token block of the whole tensor;
- ``int8-token`` / ``int4-token`` (per-token-head symmetric, as vLLM's int8/int4 KV): fp16
  scale = amax / qmax per token and head;
- ``kivi-2`` / ``kivi-4`` (arXiv 2402.02750, KIVI): keys per channel over 32-token groups,
  values per token in 32-channel groups, fp16 scale + zero; recent 32 tokens exact;
- ``turbo-4/3/2.5/2`` (arXiv 2504.19874, TurboQuant, MSE variant): randomized Hadamard
  rotation (seed 0), fp16 norm per vector, Lloyd-Max codebook for one coordinate of a random
  unit vector.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable

import torch

from vllm_seqkv.codec.base import CodecInputError, KVCodec, Packed, TensorCodec
from vllm_seqkv.codec.hadamard import RandomizedHadamard
from vllm_seqkv.codec.packing import pack_bits, unpack_bits

FP8_MAX = 448.0  # largest finite float8 e4m3fn value
TINY = 1e-8


class Bf16Codec(TensorCodec):
    """Plain bfloat16 storage: 16 bits per element, no side information."""

    def encode(self, x: torch.Tensor) -> Packed:
        self.check_input(x)
        return Packed({"values": x.to(torch.bfloat16)}, tuple(x.shape))

    def decode(self, packed: Packed) -> torch.Tensor:
        return packed.fields["values"].float()

    def bits_per_element(self, num_kv_heads: int, head_dim: int) -> float:
        return 16.0


class Fp8BlockCodec(TensorCodec):
    """float8 e4m3 values with one fp32 scale (amax/448) per ``block_size``-token block.

    The scale covers the whole block tensor ``[block_size, num_kv_heads, head_dim]``.
    """

    def __init__(self, block_size: int = 16):
        self.block_size = block_size

    def encode(self, x: torch.Tensor) -> Packed:
        self.check_input(x)
        blocks = x.float().reshape(-1, self.block_size, *x.shape[1:])  # [B, bs, H, D]
        scale = (blocks.abs().amax(dim=(1, 2, 3)) / FP8_MAX).clamp_min(TINY)  # [B]
        codes = (blocks / scale[:, None, None, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
        return Packed({"codes": codes.reshape(-1), "scale": scale}, tuple(x.shape))

    def decode(self, packed: Packed) -> torch.Tensor:
        scale = packed.fields["scale"]
        codes = packed.fields["codes"].view(torch.float8_e4m3fn).float()
        blocks = codes.view(scale.numel(), -1) * scale[:, None]
        return blocks.view(packed.shape)

    def bits_per_element(self, num_kv_heads: int, head_dim: int) -> float:
        return 8.0 + 32.0 / (self.block_size * num_kv_heads * head_dim)


class IntPerTokenCodec(TensorCodec):
    """Symmetric ``bits``-bit integers, one fp16 scale (amax / (2**(bits-1)-1)) per token-head."""

    def __init__(self, bits: int):
        self.bits = bits
        self.qmax = (1 << (bits - 1)) - 1

    def encode(self, x: torch.Tensor) -> Packed:
        self.check_input(x)
        x = x.float()
        scale = (x.abs().amax(dim=-1, keepdim=True) / self.qmax).clamp_min(TINY).half()  # [T, H, 1]
        q = torch.round(x / scale.float()).clamp(-self.qmax, self.qmax) + self.qmax
        return Packed({"codes": pack_bits(q.to(torch.uint8), self.bits), "scale": scale}, tuple(x.shape))

    def decode(self, packed: Packed) -> torch.Tensor:
        count = math.prod(packed.shape)
        q = unpack_bits(packed.fields["codes"], self.bits, count).float() - self.qmax
        return q.view(packed.shape) * packed.fields["scale"].float()

    def bits_per_element(self, num_kv_heads: int, head_dim: int) -> float:
        return self.bits + 16.0 / head_dim


def _asymmetric_codes(x: torch.Tensor, dim: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min/max uniform quantizer reducing over ``dim``: returns uint8 codes, fp16 scale, fp16 zero."""
    levels = (1 << bits) - 1
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    zero = lo.half()
    scale = ((hi - zero.float()) / levels).clamp_min(TINY).half()
    q = torch.round((x - zero.float()) / scale.float()).clamp(0, levels)
    return q.to(torch.uint8), scale, zero


class KiviKeyCodec(TensorCodec):
    """KIVI keys: per-channel asymmetric quantization over groups of ``group`` tokens.

    For each group of ``group`` consecutive tokens and each (head, channel): fp16 min (zero)
    and fp16 step. Bits = ``bits + 2*16/group``.
    """

    def __init__(self, bits: int, group: int = 32):
        self.bits = bits
        self.block_size = group

    def encode(self, x: torch.Tensor) -> Packed:
        self.check_input(x)
        groups = x.float().reshape(-1, self.block_size, *x.shape[1:])  # [G, group, H, D]
        q, scale, zero = _asymmetric_codes(groups, dim=1, bits=self.bits)
        return Packed({"codes": pack_bits(q, self.bits), "scale": scale, "zero": zero}, tuple(x.shape))

    def decode(self, packed: Packed) -> torch.Tensor:
        scale, zero = packed.fields["scale"].float(), packed.fields["zero"].float()  # [G, 1, H, D]
        count = math.prod(packed.shape)
        q = unpack_bits(packed.fields["codes"], self.bits, count).float()
        q = q.view(scale.shape[0], self.block_size, *packed.shape[1:])
        return (q * scale + zero).reshape(packed.shape)

    def bits_per_element(self, num_kv_heads: int, head_dim: int) -> float:
        return self.bits + 32.0 / self.block_size


class KiviValueCodec(TensorCodec):
    """KIVI values: per-token asymmetric quantization in groups of ``group`` channels.

    Bits = ``bits + 2*16/group``; ``head_dim`` must be a multiple of ``group``.
    """

    def __init__(self, bits: int, group: int = 32):
        self.bits = bits
        self.group = group

    def encode(self, x: torch.Tensor) -> Packed:
        self.check_input(x)
        if x.shape[-1] % self.group:
            raise CodecInputError(f"KiviValueCodec: head_dim {x.shape[-1]} is not a multiple of group {self.group}")
        groups = x.float().reshape(*x.shape[:2], -1, self.group)  # [T, H, D/group, group]
        q, scale, zero = _asymmetric_codes(groups, dim=-1, bits=self.bits)
        return Packed({"codes": pack_bits(q, self.bits), "scale": scale, "zero": zero}, tuple(x.shape))

    def decode(self, packed: Packed) -> torch.Tensor:
        scale, zero = packed.fields["scale"].float(), packed.fields["zero"].float()  # [T, H, D/g, 1]
        count = math.prod(packed.shape)
        q = unpack_bits(packed.fields["codes"], self.bits, count).float().view(*scale.shape[:-1], self.group)
        return (q * scale + zero).reshape(packed.shape)

    def bits_per_element(self, num_kv_heads: int, head_dim: int) -> float:
        return self.bits + 32.0 / self.group


@lru_cache(maxsize=None)
def lloyd_max_codebook(dim: int, bits: int, iterations: int = 1000) -> torch.Tensor:
    """Lloyd-Max (MSE-optimal scalar) codebook ``[2**bits]`` for one coordinate of a random unit vector.

    A coordinate of a uniform point on the sphere in ``dim`` dimensions has density
    proportional to ``(1 - t**2) ** ((dim - 3) / 2)`` on ``[-1, 1]`` (a shifted Beta; close to
    ``N(0, 1/dim)``). Solved numerically on a fine grid (cumulative mass and first moment, so
    one Lloyd iteration costs ``O(2**bits)``), deterministic and exactly symmetric.
    """
    grid = torch.linspace(-1, 1, 2_000_001, dtype=torch.float64)[1:-1]
    density = (1 - grid**2).clamp_min(0) ** ((dim - 3) / 2)
    zero = torch.zeros(1, dtype=torch.float64)
    cum_mass = torch.cat([zero, density.cumsum(0)])
    cum_moment = torch.cat([zero, (density * grid).cumsum(0)])
    levels = 1 << bits
    quantiles = (torch.arange(levels, dtype=torch.float64) + 0.5) / levels
    centers = grid[torch.searchsorted(cum_mass[1:] / cum_mass[-1], quantiles).clamp(max=grid.numel() - 1)]
    ends = torch.tensor([grid.numel()])
    for _ in range(iterations):
        cuts = torch.searchsorted(grid, (centers[1:] + centers[:-1]) / 2)
        bounds = torch.cat([ends * 0, cuts, ends])
        mass = cum_mass[bounds[1:]] - cum_mass[bounds[:-1]]
        moment = cum_moment[bounds[1:]] - cum_moment[bounds[:-1]]
        updated = torch.where(mass > 0, moment / mass.clamp_min(1e-300), centers)
        if torch.equal(updated, centers):
            break
        centers = updated
    return ((centers - centers.flip(0)) / 2).float()  # the density is even: exact symmetry


class TurboCodec(TensorCodec):
    """TurboQuant-style rotation + scalar code (arXiv 2504.19874, the MSE-optimal variant).

    Per token-head vector ``x`` (``head_dim`` a power of two): store ``||x||`` in fp16, rotate
    ``u = R x/||x||`` with a randomized Hadamard ``R`` (fixed seed), code every coordinate of
    ``u`` with the Lloyd-Max codebook of the coordinate distribution. ``bit_split`` gives the
    width of each half of the rotated coordinates: ``(b, b)`` is the plain ``b``-bit code;
    ``(3, 2)`` is the 2.5-bit setting — the paper reaches fractional widths by splitting
    channels into two sets coded by independent quantizers at different widths; after the
    random rotation the coordinates are exchangeable, so we give the first half 3 bits and
    the second half 2 bits. Bits = ``mean(bit_split) + 16/head_dim``.
    """

    def __init__(self, bit_split: tuple[int, int], seed: int = 0):
        self.bit_split = bit_split
        self.seed = seed

    def encode(self, x: torch.Tensor) -> Packed:
        self.check_input(x)
        head_dim = x.shape[-1]
        rot = RandomizedHadamard(head_dim, self.seed)
        x = x.float()
        norm = x.norm(dim=-1, keepdim=True).half()  # [T, H, 1]
        unit = rot.forward(x / norm.float().clamp_min(TINY))
        fields: dict[str, torch.Tensor] = {"norm": norm}
        for name, part, bits in self._halves(unit):
            book = lloyd_max_codebook(head_dim, bits)
            codes = torch.bucketize(part.contiguous(), (book[1:] + book[:-1]) / 2)
            fields[name] = pack_bits(codes.to(torch.uint8), bits)
        return Packed(fields, tuple(x.shape))

    def decode(self, packed: Packed) -> torch.Tensor:
        head_dim = packed.shape[-1]
        half_shape = (*packed.shape[:-1], head_dim // 2)
        parts = []
        for name, bits in zip(("codes_a", "codes_b"), self.bit_split):
            book = lloyd_max_codebook(head_dim, bits)
            codes = unpack_bits(packed.fields[name], bits, math.prod(half_shape)).long()
            parts.append(book[codes].view(half_shape))
        unit = RandomizedHadamard(head_dim, self.seed).inverse(torch.cat(parts, dim=-1))
        return unit * packed.fields["norm"].float()

    def _halves(self, unit: torch.Tensor):
        half = unit.shape[-1] // 2
        yield "codes_a", unit[..., :half], self.bit_split[0]
        yield "codes_b", unit[..., half:], self.bit_split[1]

    def bits_per_element(self, num_kv_heads: int, head_dim: int) -> float:
        return sum(self.bit_split) / 2 + 16.0 / head_dim


def _same(name: str, make: Callable[[], TensorCodec], **windows) -> Callable[[], KVCodec]:
    return lambda: KVCodec(name=name, key=make(), value=make(), **windows)


def _kivi(bits: int) -> Callable[[], KVCodec]:
    return lambda: KVCodec(name=f"kivi-{bits}", key=KiviKeyCodec(bits), value=KiviValueCodec(bits),
                           exact_recent=32)


BASELINES: dict[str, Callable[[], KVCodec]] = {
    "bf16": _same("bf16", Bf16Codec),
    "fp8-e4m3": _same("fp8-e4m3", Fp8BlockCodec, block_exact=True),
    "int8-token": _same("int8-token", lambda: IntPerTokenCodec(8)),
    "int4-token": _same("int4-token", lambda: IntPerTokenCodec(4)),
    "kivi-4": _kivi(4),
    "kivi-2": _kivi(2),
    "turbo-4": _same("turbo-4", lambda: TurboCodec((4, 4))),
    "turbo-3": _same("turbo-3", lambda: TurboCodec((3, 3))),
    "turbo-2.5": _same("turbo-2.5", lambda: TurboCodec((3, 2))),
    "turbo-2": _same("turbo-2", lambda: TurboCodec((2, 2))),
}
