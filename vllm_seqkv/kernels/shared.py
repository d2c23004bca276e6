"""Helpers the kernels of every slot format use."""

from __future__ import annotations

from dataclasses import fields, replace

import torch

TARGET_PROGRAMS = 512  # enough (B * H_kv * splits) programs to fill an H100/H200 (132 SMs)
MIN_PAGES_PER_SPLIT = 4


def tensors_to(params, device):
    """A copy of the frozen dataclass ``params`` with every tensor field on ``device``."""
    return replace(params, **{f.name: getattr(params, f.name).to(device) for f in fields(params)
                              if isinstance(getattr(params, f.name), torch.Tensor)})


def choose_splits(batch: int, kv_heads: int, max_pages: int) -> int:
    """Split-K factor: enough programs to fill the GPU, at least MIN_PAGES_PER_SPLIT pages each."""
    wanted = -(-TARGET_PROGRAMS // max(batch * kv_heads, 1))
    return max(1, min(wanted, -(-max_pages // MIN_PAGES_PER_SPLIT)))
