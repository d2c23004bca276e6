"""Kernels over compressed KV pages: one entry point per op, dispatched by the table
:data:`KERNELS` over (slot format, op, implementation), with the torch reference of
:data:`REFERENCES` as the fallback and the ground truth of every test.

Slot formats (told apart by the layer's params; build them once per layer with
:func:`layer_params` from the engine's SlotLayout): the *transform* format of the seqkv
presets (:class:`TransformLayerParams`) and the *rotation* format of the ``seqkv-3-rot``
ablation (:class:`LayerKernelParams`). Layer 0 of a token-table preset is a row gather
with no kernel params (``layer_params`` refuses it, naming the codec).

Ops (``previous``: the layer below's reconstruction in the coding frame, for cross-layer
transform layers; ``rope``: a :func:`rope_cache` table, to return pre-RoPE keys rotated):

- ``write_slots(key [T,H,D], value [T,H,D], slot_mapping int [T], pages uint8 [N,H,bs,S],
  params, previous=None)``: code new tokens into their slots in place (slot -1 = padding);
- ``paged_decode_attention(query [B,Hq,D], own_k [B,H,D], own_v [B,H,D], pages, block_table
  int [B,max_blocks], seq_lens int [B], params, scale, rope=None, previous=None,
  skip_first=0, return_lse=False) -> [B,Hq,D]`` (and ``lse [B,Hq]``): one query per sequence,
  position ``seq_lens - 1`` read exactly from own_k/own_v;
- ``reconstruct_blocks(pages, block_ids int [M], params, previous=None, rope=None,
  block_positions=None) -> (K, V)`` float32 ``[M*bs, H, D]`` for prefill.

Implementation (``SEQKV_KERNELS`` = ``auto`` | ``cpp`` | ``triton`` | ``cuda`` | ``torch``):
``auto`` is Triton on CUDA tensors and the C++ CPU ops (``csrc/cpu/``) on CPU tensors, or the
torch reference with ONE warning when those are missing. ``cpp`` covers transform layers
without cross-layer prediction (others run the reference; :func:`runs_kernel` says which);
``cuda`` runs the CUDA ops (``csrc/*.cu``) where the table has one and Triton otherwise, with
a warning. The choice is logged once per device.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from vllm_seqkv.kernels import cpu_ops
from vllm_seqkv.kernels.checks import KernelArgumentError
from vllm_seqkv.kernels.rotation.params import LayerKernelParams, StreamParams
from vllm_seqkv.kernels.rotation.params import layer_params as rotation_layer_params
from vllm_seqkv.kernels.params import (
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
    return cpu_ops.load_cpu_ops()


def implementation(device: torch.device) -> str:
    """Which implementation runs for tensors on ``device``: "cpp", "triton", "cuda" or "torch".
    NOTE: decided once per (device, ``SEQKV_KERNELS``, C++ ops loaded) and kept: every layer
    asks, several times per step, so a decided case is one dict lookup."""
    raw = os.environ.get("SEQKV_KERNELS", "auto")
    decided = _decided.get((device, raw, cpu_ops._loaded))
    if decided is not None:
        return decided
    chosen = _decide(device, raw.lower())
    _decided[(device, raw, cpu_ops._loaded)] = chosen
    return chosen


_decided: dict[tuple, str] = {}


def _decide(device, wanted: str) -> str:
    name = str(device)
    chosen = _choose_implementation(torch.device(device), wanted)
    if (name, chosen) not in _announced:
        _announced.add((name, chosen))
        if chosen == "cpp":
            logger.info("seqkv kernels: cpp implementation on %s (C++ CPU ops, %s)", device, cpu_ops.active_isa())
        else:
            logger.info("seqkv kernels: %s implementation on %s", chosen, device)
    return chosen


def _choose_implementation(device: torch.device, wanted: str) -> str:
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


# (slot format, op, implementation) -> "module:function" of this package; the torch reference
# of each (format, op) takes the params' SlotLayout where the kernels take the params
KERNELS = {
    ("transform", "write", "cpp"): "cpu_ops:write_transform_slots_cpp",
    ("transform", "write", "cuda"): "cuda_ops:write_transform_slots_cuda",
    ("transform", "write", "triton"): "write:write_transform_slots",
    ("transform", "decode", "cpp"): "cpu_ops:transform_decode_attention_cpp",
    ("transform", "decode", "cuda"): "cuda_ops:transform_decode_attention_cuda",
    ("transform", "decode", "triton"): "decode:fused_transform_decode_attention",
    ("transform", "reconstruct", "cpp"): "cpu_ops:reconstruct_transform_blocks_cpp",
    ("transform", "reconstruct", "triton"): "reconstruct:reconstruct_transform_blocks",
    ("rotation", "write", "cuda"): "cuda_ops:write_slots_cuda",
    ("rotation", "write", "triton"): "rotation.write:write_slots_triton",
    ("rotation", "decode", "cuda"): "cuda_ops:paged_decode_attention_cuda",
    ("rotation", "decode", "triton"): "rotation.decode_attention:paged_decode_attention_triton",
    ("rotation", "reconstruct", "triton"): "rotation.reconstruct:reconstruct_blocks_triton",
}
REFERENCES = {
    ("transform", "write"): "reference:write_transform_reference",
    ("transform", "decode"): "reference:transform_decode_attention_reference",
    ("transform", "reconstruct"): "reference:reconstruct_transform_reference",
    ("rotation", "write"): "reference:write_slots_reference",
    ("rotation", "decode"): "reference:paged_decode_attention_reference",
    ("rotation", "reconstruct"): "reference:reconstruct_blocks_reference",
}


@functools.cache
def _function(path: str):
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def _kernel_for(fmt: str, op: str, params, device: torch.device):
    """The kernel of one call, or None for the torch reference. ``cuda`` without a CUDA op for
    the call (or without the built extension) runs Triton, with one warning per device."""
    kind = implementation(device)
    if kind == "cpp" and fmt == "transform" and not _cpp_covers(params):
        return None
    if kind == "cuda":
        from vllm_seqkv.kernels.cuda_ops import load_cuda_ops

        if (fmt, op, "cuda") not in KERNELS or not load_cuda_ops():
            why = "vllm_seqkv._C is not built" if not load_cuda_ops() else f"no CUDA op for {fmt} {op}"
            key = ("cuda-fallback", f"{device}:{why}")
            if key not in _announced:
                _announced.add(key)
                logger.warning("seqkv kernels: SEQKV_KERNELS=cuda but %s; using Triton on %s", why, device)
            kind = "triton"
    path = KERNELS.get((fmt, op, kind))
    return _function(path) if path else None


def _run(fmt: str, op: str, params, device: torch.device, head: tuple, tail: tuple = (), **extra):
    """``kernel(*head, params, *tail, **extra)`` or ``reference(*head, layout, *tail, **extra)``."""
    kernel = _kernel_for(fmt, op, params, device)
    if kernel is not None:
        return kernel(*head, params, *tail, **extra)
    return _function(REFERENCES[(fmt, op)])(*head, _layout(params), *tail, **extra)


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
    head = (key, value, slot_mapping, pages)
    if isinstance(params, TransformLayerParams):
        _needs_previous(params, previous)
        return _run("transform", "write", params, pages.device, head, (previous,))
    _rotation_only(None, previous)
    return _run("rotation", "write", params, pages.device, head)


def paged_decode_attention(query: torch.Tensor, own_k: torch.Tensor, own_v: torch.Tensor,
                           pages: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                           params, scale: float, rope: torch.Tensor | None = None,
                           previous=None, skip_first: int = 0, return_lse: bool = False, sinks=None):
    """``sinks``: ``(sink_k, sink_v) [B, S, H, D]``, exact rows of positions ``0 .. S - 1`` (``S <=
    skip_first``) merged into the result (the C++ op merges them itself; the other
    implementations' result is merged by :func:`~.reference.merge_sink_rows`)."""
    head = (query, own_k, own_v, pages, block_table, seq_lens)
    if isinstance(params, TransformLayerParams):
        _needs_previous(params, previous)
        kernel = _kernel_for("transform", "decode", params, pages.device)
        if sinks is not None and kernel is _function(KERNELS[("transform", "decode", "cpp")]):
            return kernel(*head, params, scale, rope=rope, previous=previous, skip_first=skip_first,
                          return_lse=return_lse, sinks=sinks)
        result = _run("transform", "decode", params, pages.device, head, (scale,), rope=rope,
                      previous=previous, skip_first=skip_first, return_lse=return_lse or sinks is not None)
        if sinks is None:
            return result
        from vllm_seqkv.kernels.reference import merge_sink_rows

        if sinks[0].shape[1] > skip_first:
            raise KernelArgumentError(f"sinks: {sinks[0].shape[1]} exact rows but skip_first {skip_first}")
        out = merge_sink_rows(result[0], result[1], query, sinks[0], sinks[1], seq_lens, scale)
        return (out, None) if return_lse else out
    _rotation_only(rope, previous)
    if skip_first or return_lse:
        raise KernelArgumentError("skip_first/return_lse apply to the transform format only")
    return _run("rotation", "decode", params, pages.device, head, (scale,))


def decodes_without_own_token(params, device: torch.device) -> bool:
    """Whether :func:`paged_decode_attention` on ``device`` takes ``own_k = own_v = None`` (a pass
    over positions the queries are not part of): the C++ CPU op and the reference do."""
    return isinstance(params, TransformLayerParams) and _kernel_for("transform", "decode", params, device) is _function(
        KERNELS[("transform", "decode", "cpp")])


def write_tokens_fused(key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor,
                       positions: torch.Tensor, pages: torch.Tensor, params, rope: torch.Tensor | None = None):
    """The engine's write of new tokens in one C++ op (see
    :func:`~.cpu_ops.write_transform_tokens_cpp`), or None when the implementation on the pages'
    device has no such op (the caller then writes through :func:`write_slots`)."""
    if _kernel_for("transform", "write", params, pages.device) is not _function(KERNELS[("transform", "write", "cpp")]):
        return None
    from vllm_seqkv.kernels.cpu_ops import write_transform_tokens_cpp

    return write_transform_tokens_cpp(key, value, slot_mapping, positions, pages, params, rope)


def reconstruct_blocks(pages: torch.Tensor, block_ids: torch.Tensor, params, previous=None,
                       rope: torch.Tensor | None = None, block_positions: torch.Tensor | None = None):
    if isinstance(params, TransformLayerParams):
        _needs_previous(params, previous)
        return _run("transform", "reconstruct", params, pages.device, (pages, block_ids),
                    (previous, rope, block_positions))
    _rotation_only(rope, previous)
    return _run("rotation", "reconstruct", params, pages.device, (pages, block_ids))
