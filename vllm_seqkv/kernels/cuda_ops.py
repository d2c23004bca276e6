"""Python side of the csrc/ CUDA ops (``torch.ops.seqkv.*``, built as ``vllm_seqkv._C``).

Same contracts as the Triton wrappers. ``load_cuda_ops()`` returns False when the extension
was not built (CPU installs); the fake (meta) implementations let ``torch.library.opcheck``
and torch.compile trace the ops.
"""

from __future__ import annotations

import torch

from vllm_seqkv.kernels.decode_attention import check_decode_args
from vllm_seqkv.kernels.params import LayerKernelParams, StreamParams
from vllm_seqkv.kernels.write_kernel import check_write_args, rotate_stream

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
