"""Decode-time kernels over compressed KV pages, with a pure-torch fallback.

Two slot formats, told apart by the layer's params (build them with :func:`layer_params`
from the engine's SlotLayout, once per layer, on the cache's device):

- rotation format (``seqkv-3-rot``, ``-rot-none``): :class:`LayerKernelParams`; Triton and
  CUDA (``csrc/``) kernels, including a fused paged decode attention;
- transform format (``seqkv-2/2.5/3/4``, ``seqkv-3-nox``): :class:`TransformLayerParams`;
  Triton kernels for writing and reconstructing pages and a fused paged decode attention
  (:mod:`.transform_decode`; every layer, cross-layer ones included), and CUDA ops
  (``csrc/transform_*.cu``, :mod:`.cuda_ops`) for the write and the fused decode (float32
  math; reconstruction has no CUDA op). The older "reconstruct + torch SDPA" decode stays in
  :mod:`.transform_reconstruct` (benchmark baseline).

Layer 0 of the transform presets is a token table (:mod:`vllm_seqkv.codec.token_table`):
its slot is a row index, reconstructed by a table gather; it has no kernel params yet
(``layer_params`` refuses it, naming the codec).

Backend-facing API (``previous``: the layer below's reconstruction of the same rows in the
coding frame, needed by cross-layer transform layers; ``rope``: a
:func:`~vllm_seqkv.kernels.transform_params.rope_cache` table to return keys RoPE-rotated,
transform format only):

- ``write_slots(key [T,H,D], value [T,H,D], slot_mapping int [T], pages uint8 [N,H,bs,S],
  params, previous=None)`` codes new tokens into their slots in place (slot -1 = padding);
- ``paged_decode_attention(query [B,Hq,D], own_k [B,H,D], own_v [B,H,D], pages, block_table
  int [B,max_blocks], seq_lens int [B], params, scale, rope=None, previous=None) -> [B,Hq,D]``:
  one query per sequence; the last position (``seq_lens - 1``) is read exactly from
  own_k/own_v (transform format: ``previous`` is ``[B, max_blocks * bs, H, D]``; also
  ``skip_first`` (positions not read) and ``return_lse`` (-> ``(out, lse [B, Hq])``));
- ``reconstruct_blocks(pages, block_ids int [M], params, previous=None, rope=None,
  block_positions=None) -> (K, V)`` float32 ``[M*bs, H, D]`` for prefill.

Implementation choice (``SEQKV_KERNELS`` = ``auto`` | ``cpp`` | ``triton`` | ``cuda`` | ``torch``):
``auto`` uses Triton on CUDA tensors and the C++ CPU ops (``cpp``, :mod:`.cpu_ops`,
``csrc/cpu/``) on CPU tensors when ``vllm_seqkv._cpu`` is built, else the torch reference with
ONE warning (``seqkv: C++ CPU kernels not built (...); using the slow torch path``); on a GPU
without Triton it falls back to the reference with a warning. ``cpp`` covers the transform
format without cross-layer prediction (``seqkv-3-nox``; every call of :func:`write_slots`,
:func:`paged_decode_attention`, :func:`reconstruct_blocks`); other params (rotation format,
cross-layer layers) run the torch reference under ``cpp`` (:func:`runs_kernel` says which).
``SEQKV_KERNELS=cpp`` where the extension does not load is an error. ``torch`` stays the
reference. ``cuda`` on the transform format runs
the CUDA ops for ``write_slots`` and ``paged_decode_attention`` when ``vllm_seqkv._C`` is built
(else Triton, with a warning) and Triton for ``reconstruct_blocks`` (no CUDA op; warning).
The CUDA ops' per-element math (``csrc/transform_format.cuh``) is checked on CPU by compiling it
with g++ into a host test (tests/kernels/test_transform_host.py); their thread/block structure
only on a GPU (tests/kernels/test_cuda_ops.py, never run so far). The choice is logged once
per device.
"""

from __future__ import annotations

import logging
import os

import torch

from vllm_seqkv.kernels.checks import KernelArgumentError
from vllm_seqkv.kernels.params import LayerKernelParams, StreamParams
from vllm_seqkv.kernels.params import layer_params as rotation_layer_params
from vllm_seqkv.kernels.transform_params import (
    TransformLayerParams,
    is_transform_layout,
    rope_cache,
    transform_layer_params,
)

__all__ = ["KernelArgumentError", "LayerKernelParams", "StreamParams", "TransformLayerParams",
           "implementation", "layer_params", "paged_decode_attention", "reconstruct_blocks",
           "rope_cache", "runs_kernel", "write_slots"]

logger = logging.getLogger("vllm.seqkv.kernels")
CHOICES = ("auto", "cpp", "triton", "cuda", "torch")
CPP_MISSING_WARNING = "seqkv: C++ CPU kernels not built (%s); using the slow torch path"
_announced: set[tuple[str, str]] = set()


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _cpp_available() -> bool:
    from vllm_seqkv.kernels.cpu_ops import load_cpu_ops

    return load_cpu_ops()


def implementation(device: torch.device) -> str:
    """Which implementation runs for tensors on ``device``: "cpp", "triton", "cuda" or "torch"."""
    device = torch.device(device)
    wanted = os.environ.get("SEQKV_KERNELS", "auto").lower()
    if wanted not in CHOICES:
        raise ValueError(f"SEQKV_KERNELS={wanted!r}; choose one of {', '.join(CHOICES)}")
    if wanted == "cpp":
        if device.type != "cpu":
            raise ValueError(f"SEQKV_KERNELS=cpp runs the C++ CPU ops; tensors are on {device}")
        if not _cpp_available():
            from vllm_seqkv.kernels.cpu_ops import load_error

            raise RuntimeError(f"SEQKV_KERNELS=cpp but the C++ CPU kernels are not built ({load_error()}); "
                               "run `bash scripts/setup.sh` (or `python setup.py build_ext --inplace`)")
    if wanted == "auto":
        if device.type == "cpu":
            chosen = "cpp" if _cpp_available() else "torch"
            if chosen == "torch" and ("cpp-missing", "cpu") not in _announced:
                from vllm_seqkv.kernels.cpu_ops import load_error

                _announced.add(("cpp-missing", "cpu"))
                logger.warning(CPP_MISSING_WARNING, load_error() or "vllm_seqkv._cpu not importable")
        elif device.type != "cuda":
            chosen = "torch"
        elif _triton_available():
            chosen = "triton"
        else:
            chosen = "torch"
            logger.warning("seqkv kernels: Triton is not importable; using the slow torch "
                           "reference on %s", device)
    else:
        chosen = wanted
    if (str(device), chosen) not in _announced:
        _announced.add((str(device), chosen))
        if chosen == "cpp":
            from vllm_seqkv.kernels.cpu_ops import active_isa

            logger.info("seqkv kernels: cpp implementation on %s (C++ CPU ops, %s)", device, active_isa())
        else:
            logger.info("seqkv kernels: %s implementation on %s", chosen, device)
    return chosen


def _cpp_covers(params) -> bool:
    return isinstance(params, TransformLayerParams) and not params.cross_layer


def runs_kernel(params, device: torch.device) -> bool:
    """True when calls with ``params`` (None: a layer without kernel params) on ``device`` run a
    kernel, False when they run the torch reference (``torch``, or ``cpp`` on params the C++ ops
    do not cover): callers then use the codec directly (the same result, on the rows they need)."""
    if params is None:
        return False
    kind = implementation(device)
    return kind != "torch" and (kind != "cpp" or _cpp_covers(params))


def layer_params(layout, device=None) -> LayerKernelParams | TransformLayerParams:
    """Kernel constants of one layer's SlotLayout, for whichever format it codes."""
    from vllm_seqkv.codec.token_table import TokenTableCodec

    if isinstance(layout.key, TokenTableCodec):
        raise KernelArgumentError("layer 0 is a token table (a row gather): no kernel params for it yet")
    if is_transform_layout(layout):
        return transform_layer_params(layout, device)
    return rotation_layer_params(layout, device)


def _layout(params):
    if params.layout is None:
        raise KernelArgumentError("params carry no SlotLayout: build them with layer_params(layout)")
    return params.layout


def _transform_kind(device: torch.device, has_cuda_op: bool = True) -> str:
    """Implementation of one transform-format call; ``cuda`` runs the CUDA op when the
    extension is built and the call has one (write, fused decode), else Triton with a warning."""
    kind = implementation(device)
    if kind != "cuda":
        return kind
    from vllm_seqkv.kernels.cuda_ops import load_cuda_ops

    if has_cuda_op and load_cuda_ops():
        return "cuda"
    why = "no CUDA op for it" if load_cuda_ops() else "vllm_seqkv._C is not built"
    key = ("cuda-transform", f"{device}:{why}")
    if key not in _announced:
        _announced.add(key)
        logger.warning("seqkv kernels: transform format with SEQKV_KERNELS=cuda but %s; using Triton on %s",
                       why, device)
    return "triton"


def _needs_previous(params: TransformLayerParams, previous) -> None:
    if params.cross_layer and previous is None:
        raise KernelArgumentError("this layer is predicted from the layer below (cross-layer preset): "
                                  "pass previous=(K, V), the layer below's reconstruction of the same "
                                  "rows in the coding frame")


def _rotation_only(rope, previous) -> None:
    if rope is not None or previous is not None:
        raise KernelArgumentError("rope/previous apply to the transform format only "
                                  "(rotation-format keys are read as cached)")


def write_slots(key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor,
                pages: torch.Tensor, params, previous=None) -> None:
    if isinstance(params, TransformLayerParams):
        _needs_previous(params, previous)
        kind = _transform_kind(pages.device)
        if kind == "cpp" and not params.cross_layer:
            from vllm_seqkv.kernels.cpu_ops import write_transform_slots_cpp
            return write_transform_slots_cpp(key, value, slot_mapping, pages, params, previous)
        if kind == "cuda":
            from vllm_seqkv.kernels.cuda_ops import write_transform_slots_cuda
            return write_transform_slots_cuda(key, value, slot_mapping, pages, params, previous)
        if kind == "triton":
            from vllm_seqkv.kernels.transform_write import write_transform_slots
            return write_transform_slots(key, value, slot_mapping, pages, params, previous)
        from vllm_seqkv.kernels.reference import write_transform_reference
        return write_transform_reference(key, value, slot_mapping, pages, _layout(params), previous)
    _rotation_only(None, previous)
    kind = implementation(pages.device)
    if kind == "triton":
        from vllm_seqkv.kernels.write_kernel import write_slots_triton
        return write_slots_triton(key, value, slot_mapping, pages, params)
    if kind == "cuda":
        from vllm_seqkv.kernels.cuda_ops import write_slots_cuda
        return write_slots_cuda(key, value, slot_mapping, pages, params)
    from vllm_seqkv.kernels.reference import write_slots_reference
    return write_slots_reference(key, value, slot_mapping, pages, _layout(params))


def paged_decode_attention(query: torch.Tensor, own_k: torch.Tensor, own_v: torch.Tensor,
                           pages: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                           params, scale: float, rope: torch.Tensor | None = None,
                           previous=None, skip_first: int = 0, return_lse: bool = False):
    if isinstance(params, TransformLayerParams):
        _needs_previous(params, previous)
        extra = dict(rope=rope, previous=previous, skip_first=skip_first, return_lse=return_lse)
        kind = _transform_kind(pages.device)
        if kind == "cpp" and not params.cross_layer:
            from vllm_seqkv.kernels.cpu_ops import transform_decode_attention_cpp
            return transform_decode_attention_cpp(query, own_k, own_v, pages, block_table, seq_lens,
                                                  params, scale, **extra)
        if kind == "cuda":
            from vllm_seqkv.kernels.cuda_ops import transform_decode_attention_cuda
            return transform_decode_attention_cuda(query, own_k, own_v, pages, block_table, seq_lens,
                                                   params, scale, **extra)
        if kind == "triton":
            from vllm_seqkv.kernels.transform_decode import fused_transform_decode_attention
            return fused_transform_decode_attention(query, own_k, own_v, pages, block_table, seq_lens,
                                                    params, scale, **extra)
        from vllm_seqkv.kernels.reference import transform_decode_attention_reference
        return transform_decode_attention_reference(query, own_k, own_v, pages, block_table, seq_lens,
                                                    _layout(params), scale, **extra)
    _rotation_only(rope, previous)
    if skip_first or return_lse:
        raise KernelArgumentError("skip_first/return_lse apply to the transform format only")
    kind = implementation(pages.device)
    if kind == "triton":
        from vllm_seqkv.kernels.decode_attention import paged_decode_attention_triton
        return paged_decode_attention_triton(query, own_k, own_v, pages, block_table, seq_lens,
                                             params, scale)
    if kind == "cuda":
        from vllm_seqkv.kernels.cuda_ops import paged_decode_attention_cuda
        return paged_decode_attention_cuda(query, own_k, own_v, pages, block_table, seq_lens,
                                           params, scale)
    from vllm_seqkv.kernels.reference import paged_decode_attention_reference
    return paged_decode_attention_reference(query, own_k, own_v, pages, block_table, seq_lens,
                                            _layout(params), scale)


def reconstruct_blocks(pages: torch.Tensor, block_ids: torch.Tensor, params, previous=None,
                       rope: torch.Tensor | None = None, block_positions: torch.Tensor | None = None):
    if isinstance(params, TransformLayerParams):
        _needs_previous(params, previous)
        kind = _transform_kind(pages.device, has_cuda_op=False)
        if kind == "cpp" and not params.cross_layer:
            from vllm_seqkv.kernels.cpu_ops import reconstruct_transform_blocks_cpp
            return reconstruct_transform_blocks_cpp(pages, block_ids, params, previous, rope, block_positions)
        if kind == "triton":
            from vllm_seqkv.kernels.transform_reconstruct import reconstruct_transform_blocks
            return reconstruct_transform_blocks(pages, block_ids, params, previous, rope, block_positions)
        from vllm_seqkv.kernels.reference import reconstruct_transform_reference
        return reconstruct_transform_reference(pages, block_ids, _layout(params), previous, rope,
                                               block_positions)
    _rotation_only(rope, previous)
    kind = implementation(pages.device)
    if kind == "triton":
        from vllm_seqkv.kernels.reconstruct import reconstruct_blocks_triton
        return reconstruct_blocks_triton(pages, block_ids, params)
    from vllm_seqkv.kernels.reference import reconstruct_blocks_reference
    return reconstruct_blocks_reference(pages, block_ids, _layout(params))
