"""Python side of the csrc/ CUDA ops (``torch.ops.seqkv.*``, built as ``vllm_seqkv._C``).

Same contracts as the Triton wrappers. ``load_cuda_ops()`` returns False when the extension
was not built (CPU installs); the fake (meta) implementations let ``torch.library.opcheck``
and torch.compile trace the ops.

Rotation format: ``write_slots_cuda``, ``paged_decode_attention_cuda``. Transform format
(:class:`TransformLayerParams`): ``write_transform_slots_cuda``,
``transform_decode_attention_cuda``; their op arguments (``*_args``) are built here and nowhere
else, so the CPU host test (tests/kernels/test_transform_host.py), which registers the same
schemas under ``seqkv_host`` with a plain C++ implementation, checks this plumbing too.
"""

from __future__ import annotations

import torch

from vllm_seqkv.kernels.rotation.decode_attention import check_decode_args
from vllm_seqkv.kernels.rotation.params import LayerKernelParams, StreamParams
from vllm_seqkv.kernels.params import TransformLayerParams
from vllm_seqkv.kernels.params import stream_format as transform_stream_format
from vllm_seqkv.kernels.params import stream_tables
from vllm_seqkv.kernels.rotation.write import check_write_args, rotate_stream

_loaded: bool | None = None


def load_cuda_ops() -> bool:
    """Import ``vllm_seqkv._C`` (registers torch.ops.seqkv) once; False when not built."""
    global _loaded
    if _loaded is None:
        try:
            import vllm_seqkv._C  # noqa: F401
        except ImportError:
            _loaded = False
        else:
            _register_fakes()
            _loaded = True
    return _loaded


def _register_fakes() -> None:
    @torch.library.register_fake("seqkv::paged_decode_attention")
    def _(query, own_k, own_v, pages, block_table, seq_lens, *rest):
        return torch.empty_like(query)

    @torch.library.register_fake("seqkv::write_slots")
    def _(*args):
        return None

    register_transform_fakes("seqkv")


def fake_write_transform_slots(*args):
    return None


def fake_transform_decode_attention(query, *args):
    """``(out [B, Hq, D]`` in the query's dtype, contiguous; ``lse`` float32 ``[B, Hq])``."""
    return query.new_empty(query.shape), query.new_empty(query.shape[:2], dtype=torch.float32)


def register_transform_fakes(namespace: str) -> None:
    """Fake implementations of the transform ops under ``namespace`` (``seqkv``; the host test's
    ``seqkv_host`` registers the same)."""
    torch.library.register_fake(f"{namespace}::write_transform_slots")(fake_write_transform_slots)
    torch.library.register_fake(f"{namespace}::transform_decode_attention")(fake_transform_decode_attention)


def stream_format(stream: StreamParams) -> list[int]:
    """``[bits_a, bits_b, norm_off, off_a, off_b]`` as the ops take it."""
    return [stream.bits_a, stream.bits_b, stream.norm_offset, stream.codes_a_offset, stream.codes_b_offset]


def _require_ops() -> None:
    if not load_cuda_ops():
        raise RuntimeError("SEQKV_KERNELS=cuda but vllm_seqkv._C is not built "
                           "(pip install --no-build-isolation -e . on a CUDA machine)")


def write_slots_args(key, value, slot_mapping, pages, params: LayerKernelParams) -> tuple:
    """Arguments of torch.ops.seqkv.write_slots (the torch half of the write path done)."""
    unit_k, norm_k = rotate_stream(key, params.key)
    unit_v, norm_v = rotate_stream(value, params.value)
    return (unit_k, norm_k.contiguous(), unit_v, norm_v.contiguous(), slot_mapping.contiguous(), pages,
            params.key.boundaries, params.value.boundaries, stream_format(params.key),
            stream_format(params.value))


def write_slots_cuda(key, value, slot_mapping, pages, params: LayerKernelParams) -> None:
    _require_ops()
    check_write_args(key, value, slot_mapping, pages, params)
    if key.shape[0]:
        torch.ops.seqkv.write_slots(*write_slots_args(key, value, slot_mapping, pages, params))


def decode_args(query, own_k, own_v, pages, block_table, seq_lens, params: LayerKernelParams,
                scale: float, num_splits: int = 0) -> tuple:
    """Arguments of torch.ops.seqkv.paged_decode_attention (num_splits 0 = automatic)."""
    k, v = params.key, params.value
    return (query, own_k, own_v, pages, block_table, seq_lens.to(block_table.dtype).contiguous(),
            k.codebook, k.signs, k.weight, k.mean, v.codebook, v.signs, v.weight, v.mean,
            stream_format(k), stream_format(v), float(scale), int(num_splits))


def paged_decode_attention_cuda(query, own_k, own_v, pages, block_table, seq_lens,
                                params: LayerKernelParams, scale: float, num_splits: int = 0) -> torch.Tensor:
    _require_ops()
    check_decode_args(query, own_k, own_v, pages, block_table, seq_lens, params)
    return torch.ops.seqkv.paged_decode_attention(
        *decode_args(query, own_k, own_v, pages, block_table, seq_lens, params, scale, num_splits))


# ---- transform format ---------------------------------------------------------------------




def write_transform_args(key, value, slot_mapping, pages, params: TransformLayerParams,
                         previous=None) -> tuple:
    """Arguments of torch.ops.seqkv.write_transform_slots (``previous``: already checked, or
    None for layers that are not cross-layer predicted)."""
    prev_k, prev_v = previous if previous is not None else (None, None)
    k, v = params.key, params.value
    return (key, value, slot_mapping.contiguous(), pages, prev_k, prev_v, stream_tables(k), stream_tables(v),
            transform_stream_format(k), transform_stream_format(v))


def write_transform_slots_cuda(key, value, slot_mapping, pages, params: TransformLayerParams,
                               previous=None) -> None:
    """The Triton ``write_transform_slots`` contract on the CUDA op."""
    from vllm_seqkv.kernels.write import check_write_args

    _require_ops()
    previous = check_write_args(key, value, slot_mapping, pages, params, previous)
    if key.shape[0]:
        torch.ops.seqkv.write_transform_slots(*write_transform_args(key, value, slot_mapping, pages, params,
                                                                    previous))


def transform_decode_args(query, own_k, own_v, pages, block_table, seq_lens, params: TransformLayerParams,
                          scale: float, rope=None, previous=None, num_splits: int | None = None,
                          skip_first: int = 0) -> tuple:
    """Arguments of torch.ops.seqkv.transform_decode_attention (num_splits None/0 = automatic;
    ``previous``: already checked, or None for layers that are not cross-layer predicted)."""
    prev_k, prev_v = previous if previous is not None else (None, None)
    k, v = params.key, params.value
    return (query, own_k, own_v, pages, block_table, seq_lens.to(block_table.dtype).contiguous(), rope,
            prev_k, prev_v, stream_tables(k), stream_tables(v), transform_stream_format(k),
            transform_stream_format(v), float(scale), int(num_splits or 0), int(skip_first))


def transform_decode_attention_cuda(query, own_k, own_v, pages, block_table, seq_lens,
                                    params: TransformLayerParams, scale: float, rope=None, previous=None,
                                    num_splits: int | None = None, skip_first: int = 0,
                                    return_lse: bool = False):
    """The ``fused_transform_decode_attention`` contract on the CUDA op (float32 math, so no
    ``precision`` argument)."""
    from vllm_seqkv.kernels.decode import check_fused_args

    _require_ops()
    previous = check_fused_args(query, own_k, own_v, pages, block_table, seq_lens, params, rope, previous,
                                skip_first)
    out, lse = torch.ops.seqkv.transform_decode_attention(*transform_decode_args(
        query, own_k, own_v, pages, block_table, seq_lens, params, scale, rope, previous, num_splits,
        skip_first))
    return (out, lse) if return_lse else out
