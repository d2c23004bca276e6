"""Per-layer constants the transform-format kernels need, read off a transform SlotLayout.

Slot format of the transform presets (``seqkv-2/2.5/3/4``, ``seqkv-3-nox``; see
:mod:`vllm_seqkv.codec.transform` and :mod:`vllm_seqkv.codec.crosslayer`): a token-head slot
is ``[K bitstream | V bitstream]``; each stream is ``sum(bits[h])`` bits, little-endian within a
byte. Components are stored in descending-width order (stable), each component's
``bits[h, c]`` bits contiguous, least significant plane first. So component ``c``'s code is

    code = (stream >> start[h, c]) & (2**bits[h, c] - 1)       (at most 2 bytes wide: bits <= 8)

and ``start`` is the codec's public ``field_offset``, checked here against its bit-plane order
(``plane_component``/``plane_index``), so a codec change that breaks the assumption fails
loudly instead of decoding garbage. A stream
decodes as ``levels[level_start[h, c] + code] @ inverse[h] + mean[h] (+ prev @ pred_w + pred_b)``.
Nothing here depends on vLLM or Triton.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from vllm_seqkv.codec.base import CodecInputError, SlotLayout, TensorCodec
from vllm_seqkv.codec.crosslayer import CrossLayerCodec
from vllm_seqkv.codec.transform import TransformCodec, level_starts
from vllm_seqkv.kernels.shared import tensors_to


@dataclass(frozen=True)
class TransformStreamParams:
    """One stream (K or V) of one layer; all tensors contiguous.

    ``mean [H, D]``, ``basis [H, D, D]`` (encode: ``z = (x - mean) @ basis``), ``inverse
    [H, D, D]`` (the codec's own float32 inverse), ``levels [n]`` and ``cuts [n]`` packed
    (component ``(h, c)``'s ``2**nbits[h, c]`` entries from ``level_start[h, c]`` on; cuts are
    the codec's decision thresholds ``(levels[i] + levels[i+1]) / 2``, +inf in the component's
    last entry), ``start``/``nbits``/``level_start`` int32 ``[H, D]`` (bit offset and width of
    each component in the stream, first entry of its levels), ``pred_w [2HD, HD]``/``pred_b [HD]`` float32 (zeros when
    the stream has no cross-layer predictor, ``has_pred`` False), ``offset``: byte offset of
    the stream in the slot, ``nbytes``: its size.

    NOTE: on the codec's device (CPU) every table is the codec's own tensor, not a copy (they
    are already float32, contiguous and in this layout): the params add no memory there.
    """

    mean: torch.Tensor
    basis: torch.Tensor
    inverse: torch.Tensor
    levels: torch.Tensor
    cuts: torch.Tensor
    start: torch.Tensor
    nbits: torch.Tensor
    level_start: torch.Tensor
    pred_w: torch.Tensor
    pred_b: torch.Tensor
    has_pred: bool
    offset: int
    nbytes: int

    def to(self, device) -> "TransformStreamParams":
        return tensors_to(self, device)


@dataclass(frozen=True)
class TransformLayerParams:
    """Both streams of one layer of a transform preset (+ the SlotLayout they came from)."""

    num_kv_heads: int
    head_dim: int
    slot_bytes: int
    key: TransformStreamParams
    value: TransformStreamParams
    layout: SlotLayout | None = field(default=None, compare=False, repr=False)
    # what an implementation derives from these params once and keeps with them (the C++ CPU
    # ops' argument lists and layer tables, see cpu_ops.layer_args); never copied by replace()
    # or to(): derived tables would not match the new object's tensors
    derived: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    @property
    def device(self) -> torch.device:
        return self.key.mean.device

    @property
    def cross_layer(self) -> bool:
        """True when decoding this layer needs the previous layer's reconstruction."""
        return self.key.has_pred or self.value.has_pred

    def to(self, device) -> "TransformLayerParams":
        return replace(self, key=self.key.to(device), value=self.value.to(device))


def is_transform_layout(layout: SlotLayout) -> bool:
    return all(_split(c, strict=False) is not None for c in (layout.key, layout.value))


def _split(codec: TensorCodec, strict: bool = True):
    if isinstance(codec, CrossLayerCodec) and isinstance(codec.inner, TransformCodec):
        return codec.inner, codec.predictor
    if isinstance(codec, TransformCodec):
        return codec, None
    if strict:
        raise CodecInputError(f"transform kernels read TransformCodec slots (optionally cross-layer); "
                              f"got {type(codec).__name__}")
    return None


def bit_starts(codec: TransformCodec) -> tuple[torch.Tensor, torch.Tensor]:
    """``start``, ``nbits`` int32 ``[H, D]``: the codec's slot format, checked against its
    bit-plane order (a kernel reads a component as one bit field)."""
    start, nbits = codec.field_offset, codec.field_bits
    comp, plane = codec.plane_component, codec.plane_index  # [H, B]
    heads = start.shape[0]
    rows = torch.arange(heads)[:, None]
    if not torch.equal(start[rows, comp].long() + plane, torch.arange(comp.shape[1]).expand_as(comp)):
        raise CodecInputError("transform slot: a component's bit planes are not contiguous LSB-first "
                              "(codec bit order changed?)")
    return start, nbits  # NOTE: the codec's own tensors (the kernels only read them)


def _stream(codec: TensorCodec, heads: int, dim: int, offset: int) -> TransformStreamParams:
    inner, predictor = _split(codec)
    t = inner.transform
    if tuple(t.mean.shape) != (heads, dim):
        raise CodecInputError(f"transform fitted for [{t.mean.shape[0]}, {t.mean.shape[1]}] heads x dim, "
                              f"layout is [{heads}, {dim}]")
    if dim % 32:
        raise CodecInputError(f"transform kernels need head_dim a multiple of 32, got {dim}")
    start, nbits = bit_starts(inner)
    levels = t.levels.float().contiguous()
    if inner.cuts.shape != levels.shape or not torch.equal(inner.level_start, level_starts(t.bits)):
        raise CodecInputError(f"transform codec's cuts {tuple(inner.cuts.shape)} / level starts do not "
                              f"match its packed levels {tuple(levels.shape)}")
    cuts = inner.cuts.float().contiguous()
    if predictor is None:
        pred_w, pred_b = torch.zeros(1, 1), torch.zeros(1)
    else:
        pred_w, pred_b = predictor.weight.float().contiguous(), predictor.bias.float().contiguous()
        if tuple(pred_w.shape) != (2 * heads * dim, heads * dim) or tuple(pred_b.shape) != (heads * dim,):
            raise CodecInputError(f"cross-layer predictor is {tuple(pred_w.shape)}, expected "
                                  f"({2 * heads * dim}, {heads * dim})")
    return TransformStreamParams(
        mean=t.mean.float().contiguous(), basis=t.basis.float().contiguous(),
        inverse=inner._inverse.float().contiguous(), levels=levels, cuts=cuts,
        start=start, nbits=nbits, level_start=inner.level_start, pred_w=pred_w, pred_b=pred_b,
        has_pred=predictor is not None,
        offset=offset, nbytes=t.bits_per_vector // 8)


def stream_tables(stream: TransformStreamParams) -> list[torch.Tensor]:
    """A stream's tables in the order the transform ops (C++ CPU and CUDA) take them
    (csrc/transform_args.h)."""
    return [stream.start, stream.nbits, stream.level_start, stream.levels, stream.cuts, stream.basis,
            stream.inverse, stream.mean, stream.pred_w, stream.pred_b]


def stream_format(stream: TransformStreamParams) -> list[int]:
    """``[offset, nbytes, has_pred]`` as the transform ops take it."""
    return [stream.offset, stream.nbytes, int(stream.has_pred)]


def transform_layer_params(layout: SlotLayout, device=None) -> TransformLayerParams:
    """Kernel constants of one transform layer's :class:`SlotLayout` (build once per layer)."""
    heads, dim = layout.num_kv_heads, layout.head_dim
    key = _stream(layout.key, heads, dim, 0)
    value = _stream(layout.value, heads, dim, key.nbytes)
    if key.nbytes != layout.key_bytes or key.nbytes + value.nbytes != layout.slot_bytes:
        raise CodecInputError(f"slot layout mismatch: kernels expect {key.nbytes}+{value.nbytes} bytes, "
                              f"layout has {layout.key_bytes}+{layout.slot_bytes - layout.key_bytes}")
    params = TransformLayerParams(heads, dim, layout.slot_bytes, key, value, layout)
    return params.to(device) if device is not None else params


def rope_cache(max_positions: int, head_dim: int, theta: float, device=None) -> torch.Tensor:
    """float32 ``[max_positions, head_dim]``: cos of the ``D/2`` frequencies, then their sin,
    with exactly the values of :func:`vllm_seqkv.codec.rope.rope_tables` (float64 angles).
    Default RoPE; the engine passes the model's own table instead (any position-only variant,
    as :func:`vllm_seqkv.codec.rope.split_table` gives it: pure rotations)."""
    from vllm_seqkv.codec.rope import default_table

    table = default_table(max_positions, head_dim, theta)
    return table.to(device) if device is not None else table
