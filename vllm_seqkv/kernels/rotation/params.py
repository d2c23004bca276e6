"""Per-layer constants the kernels need, read off a :class:`~vllm_seqkv.codec.base.SlotLayout`.

A slot (one token-head) is ``[K fields | V fields]``; each stream's fields are
``norm`` (fp16, 2 bytes), ``codes_a`` (first ``D/2`` rotated coordinates, ``bits_a`` bits each,
little-endian bit stream) and ``codes_b`` (last ``D/2``, ``bits_b`` bits). A stream decodes as

    x = (norm / sqrt(D)) * signs * fwht(centroids[codes]) / weight + mean

(:class:`~vllm_seqkv.codec.baselines.TurboCodec` wrapped, or not, by
:class:`~vllm_seqkv.codec.predictive.PredictiveCodec`). Nothing here depends on vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from vllm_seqkv.kernels.shared import tensors_to
from vllm_seqkv.codec.base import CodecInputError, SlotLayout, TensorCodec
from vllm_seqkv.codec.baselines import TurboCodec, lloyd_max_codebook
from vllm_seqkv.codec.hadamard import RandomizedHadamard, fwht
from vllm_seqkv.codec.predictive import ChannelPredictor, PredictiveCodec

NORM_BYTES = 2


@dataclass(frozen=True)
class StreamParams:
    """One stream (K or V) of one layer.

    ``codebook`` float32 ``[2**bits_a + 2**bits_b]`` (a-book then b-book); ``boundaries``
    float32 ``[2**bits_a - 1 + 2**bits_b - 1]`` (decision thresholds, same order); ``signs``,
    float32 ``[D]``; ``mean``, ``weight`` float32 ``[H, D]``; byte offsets inside the slot.
    """

    bits_a: int
    bits_b: int
    codebook: torch.Tensor
    boundaries: torch.Tensor
    signs: torch.Tensor
    mean: torch.Tensor
    weight: torch.Tensor
    norm_offset: int
    codes_a_offset: int
    codes_b_offset: int
    nbytes: int

    def to(self, device) -> "StreamParams":
        return tensors_to(self, device)


@dataclass(frozen=True)
class LayerKernelParams:
    """Both streams of a layer plus the shared ``hadamard`` matrix (float32 ``[D, D]``, +-1).

    ``layout`` is the codec's SlotLayout the constants came from (the torch reference uses it).
    """

    num_kv_heads: int
    head_dim: int
    slot_bytes: int
    key: StreamParams
    value: StreamParams
    hadamard: torch.Tensor
    layout: SlotLayout | None = field(default=None, compare=False, repr=False)

    @property
    def device(self) -> torch.device:
        return self.hadamard.device

    def to(self, device) -> "LayerKernelParams":
        return replace(self, key=self.key.to(device), value=self.value.to(device),
                       hadamard=self.hadamard.to(device))


def _split_codec(codec: TensorCodec, num_kv_heads: int, head_dim: int) -> tuple[TurboCodec, ChannelPredictor]:
    if isinstance(codec, PredictiveCodec) and isinstance(codec.inner, TurboCodec):
        return codec.inner, codec.predictor
    if isinstance(codec, TurboCodec):
        return codec, ChannelPredictor.identity(num_kv_heads, head_dim)
    raise CodecInputError(
        f"seqkv kernels read rotation codes (TurboCodec, optionally predictive); "
        f"got {type(codec).__name__}"
    )


def _stream(codec: TensorCodec, num_kv_heads: int, head_dim: int, offset: int) -> StreamParams:
    turbo, predictor = _split_codec(codec, num_kv_heads, head_dim)
    bits_a, bits_b = turbo.bit_split
    books = [lloyd_max_codebook(head_dim, b) for b in (bits_a, bits_b)]
    bounds = [(book[1:] + book[:-1]) / 2 for book in books]
    bytes_a, bytes_b = head_dim // 2 * bits_a // 8, head_dim // 2 * bits_b // 8
    if (head_dim // 2 * bits_a) % 8 or (head_dim // 2 * bits_b) % 8:
        raise CodecInputError(f"head_dim {head_dim} with bits {turbo.bit_split} does not pack into whole bytes")
    return StreamParams(
        bits_a=bits_a, bits_b=bits_b,
        codebook=torch.cat(books).float().contiguous(),
        boundaries=torch.cat(bounds).float().contiguous(),
        signs=RandomizedHadamard(head_dim, turbo.seed).signs.float().contiguous(),
        mean=predictor.mean.float().contiguous(),
        weight=predictor.weight.float().contiguous(),
        norm_offset=offset, codes_a_offset=offset + NORM_BYTES,
        codes_b_offset=offset + NORM_BYTES + bytes_a,
        nbytes=NORM_BYTES + bytes_a + bytes_b,
    )


def hadamard_matrix(dim: int) -> torch.Tensor:
    """Sylvester Hadamard matrix float32 ``[dim, dim]`` (entries +-1, symmetric)."""
    return fwht(torch.eye(dim)).contiguous()


def layer_params(layout: SlotLayout, device: torch.device | str | None = None) -> LayerKernelParams:
    """Kernel constants of one layer's :class:`SlotLayout` (build once per layer, keep)."""
    heads, dim = layout.num_kv_heads, layout.head_dim
    key = _stream(layout.key, heads, dim, 0)
    value = _stream(layout.value, heads, dim, key.nbytes)
    if key.nbytes != layout.key_bytes or key.nbytes + value.nbytes != layout.slot_bytes:
        raise CodecInputError(
            f"slot layout mismatch: kernels expect {key.nbytes}+{value.nbytes} bytes, "
            f"layout has {layout.key_bytes}+{layout.slot_bytes - layout.key_bytes}"
        )
    params = LayerKernelParams(heads, dim, layout.slot_bytes, key, value, hadamard_matrix(dim), layout)
    return params.to(device) if device is not None else params
