"""Decode-time kernels over compressed KV pages, with a pure-torch fallback.

Backend-facing API (all take the layer's :class:`LayerKernelParams`, built once per layer
with :func:`layer_params` from the engine's SlotLayout and moved to the cache's device):

- ``write_slots(key [T,H,D], value [T,H,D], slot_mapping int [T], pages uint8 [N,H,bs,S], params)``
  codes new tokens into their slots in place (slot -1 = padding);
- ``paged_decode_attention(query [B,Hq,D], own_k [B,H,D], own_v [B,H,D], pages, block_table
  int [B,max_blocks], seq_lens int [B], params, scale) -> [B,Hq,D]``: one query per sequence;
  the last position (``seq_lens - 1``) is read exactly from own_k/own_v;
- ``reconstruct_blocks(pages, block_ids int [M], params) -> (K, V)`` float32 ``[M*bs, H, D]``
  for prefill.

Implementation choice (``SEQKV_KERNELS`` = ``auto`` | ``triton`` | ``cuda`` | ``torch``):
``auto`` uses Triton on CUDA tensors and the torch reference on CPU tensors; on a GPU without
Triton it falls back to the reference with a warning. The choice is logged once per device.
"""

from __future__ import annotations

import logging
import os

import torch

from vllm_seqkv.kernels.checks import KernelArgumentError
from vllm_seqkv.kernels.params import LayerKernelParams, StreamParams, layer_params

__all__ = ["KernelArgumentError", "LayerKernelParams", "StreamParams", "implementation",
           "layer_params", "paged_decode_attention", "reconstruct_blocks", "write_slots"]

logger = logging.getLogger("vllm.seqkv.kernels")
CHOICES = ("auto", "triton", "cuda", "torch")
_announced: set[tuple[str, str]] = set()


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def implementation(device: torch.device) -> str:
    """Which implementation runs for tensors on ``device``: "triton", "cuda" or "torch"."""
    wanted = os.environ.get("SEQKV_KERNELS", "auto").lower()
    if wanted not in CHOICES:
        raise ValueError(f"SEQKV_KERNELS={wanted!r}; choose one of {', '.join(CHOICES)}")
    if wanted == "auto":
        if device.type != "cuda":
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
        logger.info("seqkv kernels: %s implementation on %s", chosen, device)
    return chosen


def _layout(params: LayerKernelParams):
    if params.layout is None:
        raise KernelArgumentError("params carry no SlotLayout: build them with layer_params(layout)")
    return params.layout


def write_slots(key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor,
                pages: torch.Tensor, params: LayerKernelParams) -> None:
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
                           params: LayerKernelParams, scale: float) -> torch.Tensor:
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


def reconstruct_blocks(pages: torch.Tensor, block_ids: torch.Tensor,
                       params: LayerKernelParams) -> tuple[torch.Tensor, torch.Tensor]:
    kind = implementation(pages.device)
    if kind == "triton":
        from vllm_seqkv.kernels.reconstruct import reconstruct_blocks_triton
        return reconstruct_blocks_triton(pages, block_ids, params)
    from vllm_seqkv.kernels.reference import reconstruct_blocks_reference
    return reconstruct_blocks_reference(pages, block_ids, _layout(params))
