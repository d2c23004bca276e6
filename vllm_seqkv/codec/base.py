"""What every KV codec is: an encode/decode pair over one cached tensor stream.

The model of the data (predictors, transforms) lives in each codec; packing lives in
:mod:`vllm_seqkv.codec.packing`. A codec never imports vLLM or CUDA.

Shapes: a stream is ``[num_tokens, num_kv_heads, head_dim]`` (K or V of one layer);
``num_tokens`` must be a multiple of ``block_size`` (tokens coded together).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import NamedTuple

import torch


class CodecInputError(ValueError):
    """Bad shape, dtype, head size or non-finite values given to a codec."""


@dataclass(frozen=True)
class Packed:
    """A coded stream: named fields (codes, scales, ...) plus the decoded shape.

    NOTE: ``nbytes`` counts every field; it is the figure all bits/element claims rest on.
    """

    fields: dict[str, torch.Tensor]
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.fields.values())

    def to_bytes(self) -> bytes:
        return b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in self.fields.values())


class TensorCodec(ABC):
    """Lossy code for one stream. Subclasses set ``block_size`` and implement the pair."""

    block_size: int = 1
    takes_previous: bool = False  # encode/decode need previous= (cross-layer prediction)

    @abstractmethod
    def encode(self, x: torch.Tensor) -> Packed: ...

    @abstractmethod
    def decode(self, packed: Packed) -> torch.Tensor: ...

    @abstractmethod
    def bits_per_element(self, num_kv_heads: int, head_dim: int) -> float:
        """Analytic all-in bits per element; tests check it equals the packed size."""

    def read_bits_per_element(self, num_kv_heads: int, head_dim: int) -> float:
        """Bits a decode step reads from memory to rebuild one element of this stream,
        dependencies included (another layer's reconstruction, a table row); fixed per-layer
        constants (means, bases, levels) are cached and counted apart. Default: its own code."""
        return self.bits_per_element(num_kv_heads, head_dim)

    @property
    def needs_dense_layer_below(self) -> bool:
        """True when decoding needs another layer's dense reconstruction (no fused read)."""
        return False

    def probe_input(self, num_kv_heads: int, head_dim: int) -> torch.Tensor:
        """One token ``[1, H, D]`` this codec accepts (layouts encode it to learn the fields)."""
        return torch.zeros(1, num_kv_heads, head_dim)

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x)).to(x.dtype)

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 3:
            raise CodecInputError(
                f"{type(self).__name__}: expected [num_tokens, num_kv_heads, head_dim], "
                f"got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise CodecInputError(f"{type(self).__name__}: expected a float tensor, got {x.dtype}")
        if x.shape[0] % self.block_size:
            raise CodecInputError(
                f"{type(self).__name__}: num_tokens {x.shape[0]} is not a multiple of "
                f"block_size {self.block_size}"
            )
        if not torch.isfinite(x).all():
            raise CodecInputError(
                f"{type(self).__name__}: K/V contain NaN or inf; refusing to code them "
                "(a non-finite value would spread through shared scales)"
            )


@dataclass
class KVCodec:
    """A named pair of stream codecs per layer plus the exact-precision windows around them.

    Windows (all counted in :meth:`bits_per_element`):
    - ``block_exact``: tokens of the current, partially filled block stay exact until the
      block fills (block codecs, as the vLLM backend stores them);
    - ``exact_recent``: the most recent tokens stay exact (KIVI's residual window);
    - ``exact_page_block``: for per-token codecs, the positions of the sequence's current page
      block (vLLM's block of that many tokens) stay exact until the block fills;
    - ``sink_tokens``: the first tokens of a sequence stay exact.

    ``pre_rope_keys``: keys are coded in the pre-RoPE frame (callers un-rotate them by
    position before ``encode`` and rotate them back after ``decode``).
    ``cross_layer``: layer ``l``'s codecs take ``previous=`` (the reconstructed K, V of layer
    ``l - 1``, keys in the coding frame) in ``encode``/``decode``
    (:class:`~vllm_seqkv.codec.crosslayer.CrossLayerCodec`); callers go up the layers in order.
    """

    name: str
    key: TensorCodec
    value: TensorCodec
    block_exact: bool = False
    exact_recent: int = 0
    exact_page_block: int = 0
    sink_tokens: int = 0
    exact_bits: int = 16
    pre_rope_keys: bool = False
    cross_layer: bool = False
    per_layer: dict[int, tuple[TensorCodec, TensorCodec]] = field(default_factory=dict)

    def codecs_for_layer(self, layer: int) -> tuple[TensorCodec, TensorCodec]:
        return self.per_layer.get(layer, (self.key, self.value))

    @property
    def block_size(self) -> int:
        return max(self.key.block_size, self.value.block_size)

    def exact_window_start(self, position: int) -> int:
        """First cached position that token ``position`` reads exactly (others are coded)."""
        start = position - self.exact_recent
        if self.block_exact:
            start = min(start, position - position % self.block_size)
        if self.exact_page_block:
            start = min(start, position - position % self.exact_page_block)
        return max(start, 0)

    def bits_per_element(self, num_kv_heads: int, head_dim: int, context: int,
                         num_layers: int = 1) -> float:
        """All-in bits per cached element over a ``context``-token cache, all layers.

        NOTE: vLLM pages are uniform across layers, so every layer pays the largest layer's
        coded bits (a layer whose code is smaller, such as a token table, pads its slot).
        Exact windows cost ``exact_bits`` per element over their (average) length.
        """
        coded = max(self.coded_bits_per_element(layer, num_kv_heads, head_dim)
                    for layer in range(num_layers))
        exact = self._exact_tokens(context)
        return (coded * (context - exact) + self.exact_bits * exact) / context

    def coded_bits_per_element(self, layer: int, num_kv_heads: int, head_dim: int) -> float:
        key, value = self.codecs_for_layer(layer)
        return (key.bits_per_element(num_kv_heads, head_dim)
                + value.bits_per_element(num_kv_heads, head_dim)) / 2

    def decode_read_bits_per_element(self, num_kv_heads: int, head_dim: int, context: int,
                                     num_layers: int = 1) -> float:
        """Bits one decode step reads per cached element (one position, one layer, K or V),
        averaged over layers, over a ``context``-token cache.

        Per layer: each stream's :meth:`TensorCodec.read_bits_per_element` (its slot plus what
        rebuilding it depends on: the layer below's dense float32 reconstruction for
        cross-layer codecs, the table row for a token table), and ``exact_bits`` for the exact
        windows, weighted over the context as in :meth:`bits_per_element`. A layer whose slot
        is padded to the widest layer still reads only its own fields.
        """
        exact = self._exact_tokens(context)
        total = 0.0
        for layer in range(num_layers):
            key, value = self.codecs_for_layer(layer)
            coded = (key.read_bits_per_element(num_kv_heads, head_dim)
                     + value.read_bits_per_element(num_kv_heads, head_dim)) / 2
            total += (coded * (context - exact) + self.exact_bits * exact) / context
        return total / num_layers

    def transient_bytes_per_token(self, num_kv_heads: int, head_dim: int, num_layers: int = 1) -> int:
        """Bytes per cached token held outside the KV pages during a decode step.

        A codec whose layers decode from their own slots can be read inside the attention
        kernel (nothing dense is kept: 0). One that needs the layer below's dense
        reconstruction keeps two layers' float32 K and V per cached token of the running
        sequences: the one being attended and the one handed up to the next layer.
        """
        chained = any(c.needs_dense_layer_below for layer in range(num_layers)
                      for c in self.codecs_for_layer(layer))
        return 2 * 2 * num_kv_heads * head_dim * 4 if chained else 0

    def _exact_tokens(self, context: int) -> float:
        return min(context, self.sink_tokens + self.exact_recent + self.exact_page_block / 2
                   + (self.block_size / 2 if self.block_exact else 0))


class SlotField(NamedTuple):
    """One field of a slot: ``nbytes`` per token-head of ``dtype``; ``trailing``: its shape
    after ``[tokens, heads]``, or None for a flat token-major field."""

    name: str
    dtype: torch.dtype
    nbytes: int
    trailing: tuple | None


class SlotLayout:
    """Byte layout of one token-head slot for per-token codecs (``block_size == 1``): the
    public slot format that kernels, the cold coder and tests read.

    vLLM pages are ``[num_blocks, num_kv_heads, block_size, slot_bytes]``; a slot holds the
    fields of one token-head concatenated in ``Packed.fields`` order: ``fields[0]`` (K) from
    byte 0, then ``fields[1]`` (V) from ``key_bytes``.
    """

    def __init__(self, key: TensorCodec, value: TensorCodec, num_kv_heads: int, head_dim: int):
        if key.block_size != 1 or value.block_size != 1:
            raise CodecInputError("slot layouts need per-token codecs (block_size 1)")
        zeros = torch.zeros(1, num_kv_heads, head_dim)
        self.key, self.value = key, value
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.fields: tuple[tuple[SlotField, ...], tuple[SlotField, ...]] = tuple(
            self._field_specs(_encode(codec, codec.probe_input(num_kv_heads, head_dim), (zeros, zeros)))
            for codec in (key, value))
        self.key_bytes = sum(f.nbytes for f in self.fields[0])
        self.slot_bytes = self.key_bytes + sum(f.nbytes for f in self.fields[1])

    def _field_specs(self, packed: Packed) -> tuple[SlotField, ...]:
        specs = []
        for name, t in packed.fields.items():
            nbytes = t.numel() * t.element_size()
            if nbytes % self.num_kv_heads:
                raise CodecInputError(f"field {name!r} does not split into whole bytes per head")
            shaped = t.dim() >= 2 and tuple(t.shape[:2]) == (1, self.num_kv_heads)
            specs.append(SlotField(name, t.dtype, nbytes // self.num_kv_heads,
                                   tuple(t.shape[2:]) if shaped else None))
        return tuple(specs)

    def encode(self, key: torch.Tensor, value: torch.Tensor, previous=None) -> torch.Tensor:
        """``[T, H, D]`` K and V -> ``uint8 [T, H, slot_bytes]``; ``previous``: the layer
        below's reconstruction for cross-layer codecs (see :class:`KVCodec`)."""
        parts = []
        for codec, x in ((self.key, key), (self.value, value)):
            packed = _encode(codec, x, previous)
            for t in packed.fields.values():
                parts.append(t.contiguous().view(torch.uint8).reshape(x.shape[0], x.shape[1], -1))
        return torch.cat(parts, dim=-1)

    def decode(self, slots: torch.Tensor, previous=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``uint8 [T, H, slot_bytes]`` -> K, V as float32 ``[T, H, D]``."""
        tokens, heads = slots.shape[:2]
        out, start = [], 0
        for codec, specs in zip((self.key, self.value), self.fields):
            fields = {}
            for name, dtype, nbytes, trailing in specs:
                raw = slots[..., start:start + nbytes].contiguous()
                typed = raw.view(dtype)
                fields[name] = typed.reshape(-1) if trailing is None else typed.reshape(
                    tokens, heads, *trailing)
                start += nbytes
            packed = Packed(fields, (tokens, heads, self.head_dim))
            decoded = codec.decode(packed, previous) if codec.takes_previous else codec.decode(packed)
            out.append(decoded.float())
        return out[0], out[1]


def _encode(codec: TensorCodec, x: torch.Tensor, previous) -> Packed:
    return codec.encode(x, previous) if codec.takes_previous else codec.encode(x)
