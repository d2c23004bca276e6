"""Builders for the transform-format kernel tests: two-layer paged caches of a synthetic
calibration (layer 1 cross-layer predicted, closed loop), written by the codec's own code."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tests.codec.synthetic import synthetic_calibration, synthetic_capture
from vllm_seqkv.codec.base import SlotLayout
from vllm_seqkv.kernels.reference import write_transform_reference
from vllm_seqkv.kernels.params import TransformLayerParams, transform_layer_params

# per output dtype: (atol, rtol) of kernel output vs the fp32 codec reference on the same pages
TRANSFORM_TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 2e-3),
                        torch.bfloat16: (5e-2, 1e-2)}
THETA = 10000.0

# fused decode of the CUDA op and its host-math twin: (preset, kv heads, head_dim, GQA group,
# block size, layer, query dtype, rope, splits, skip_first); layer 1 of seqkv-2/2.5/3/4 is
# cross-layer predicted, seqkv-3-nox never is
FUSED_DECODE_CASES = [
    ("seqkv-3", 2, 32, 3, 16, 1, torch.float32, True, 3, 0),
    ("seqkv-3-nox", 1, 64, 4, 8, 1, torch.float32, True, None, 5),
    ("seqkv-2.5", 3, 32, 2, 16, 0, torch.bfloat16, False, 2, 0),
    ("seqkv-4", 1, 128, 1, 32, 1, torch.float16, True, 1, 40),
    ("seqkv-f4", 2, 64, 2, 16, 1, torch.float32, True, 2, 1),  # the default preset's format
]


def transform_layouts(preset: str, heads: int, dim: int) -> list[SlotLayout]:
    calibration = synthetic_calibration(preset, 2, heads, dim)
    return [SlotLayout(*calibration.codecs(layer), heads, dim) for layer in range(2)]


@dataclass
class TransformCache:
    """Pages of layers 0 and 1 holding ``seq_lens`` tokens per sequence in shuffled blocks
    (unwritten slots: random bytes, which decode to finite garbage the same way on both sides)."""

    layouts: list[SlotLayout]
    pages: list[torch.Tensor]  # uint8 [N, H, bs, S] per layer
    block_table: torch.Tensor  # int32 [B, max_blocks]
    seq_lens: torch.Tensor  # int32 [B]
    tokens: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: coding-frame K, V written [sum(seq_lens), H, D]

    def params(self, layer: int, device) -> TransformLayerParams:
        return transform_layer_params(self.layouts[layer], device)

    def to(self, device) -> "TransformCache":
        return TransformCache(self.layouts, [p.to(device) for p in self.pages], self.block_table.to(device),
                              self.seq_lens.to(device), self.tokens)


def build_transform_cache(preset: str, heads: int, dim: int, block_size: int, seq_lens: list[int],
                          seed: int = 0, extra_blocks: int = 1) -> TransformCache:
    """On CPU; ``.to(device)`` after."""
    gen = torch.Generator().manual_seed(seed)
    layouts = transform_layouts(preset, heads, dim)
    total = sum(seq_lens)
    capture = synthetic_capture(2, heads, dim, tokens=max(total, 8), seed=seed + 1)
    counts = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(counts) + extra_blocks
    order = torch.randperm(num_blocks, generator=gen)
    block_table = torch.zeros(len(seq_lens), max(counts), dtype=torch.int32)
    slots, used = [], 0
    for i, (length, count) in enumerate(zip(seq_lens, counts)):
        block_table[i, :count] = order[used:used + count]
        used += count
        pos = torch.arange(length)
        slots.append(block_table[i, pos // block_size].long() * block_size + pos % block_size)
    slot_mapping = torch.cat(slots)
    pages, tokens, previous = [], [], None
    for layer, layout in enumerate(layouts):
        page = torch.randint(0, 256, (num_blocks, heads, block_size, layout.slot_bytes), generator=gen,
                             dtype=torch.uint8)
        key, value = capture.keys[layer][:total], capture.values[layer][:total]
        write_transform_reference(key, value, slot_mapping, page, layout, previous)
        pages.append(page)
        tokens.append((key, value))
        previous = layout.decode(layout.encode(key, value, previous), previous)  # closed loop
    return TransformCache(layouts, pages, block_table, torch.tensor(seq_lens, dtype=torch.int32), tokens)


def stream_codes(slots: torch.Tensor, params: TransformLayerParams, stream: str) -> torch.Tensor:
    """Component codes ``long [T, H, D]`` read off slots ``uint8 [T, H, S]`` (torch, for tests)."""
    p = getattr(params, stream)
    raw = slots[..., p.offset:p.offset + p.nbytes].long().cpu()
    bits = ((raw[..., :, None] >> torch.arange(8)) & 1).reshape(*raw.shape[:2], -1)  # [T, H, B]
    start, nbits = p.start.long().cpu(), p.nbits.long().cpu()
    codes = torch.zeros(*raw.shape[:2], start.shape[1], dtype=torch.long)
    for j in range(8):
        pos = (start + j).clamp(max=bits.shape[-1] - 1)
        bit = bits.gather(-1, pos.expand(raw.shape[0], -1, -1))
        codes |= torch.where(j < nbits, bit, 0) << j
    return codes


def assert_threshold_flips(got: torch.Tensor, exp: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           params: TransformLayerParams, max_fraction: float = 1e-3) -> int:
    """Slots ``got`` vs ``exp`` uint8 ``[T, H, S]`` of tokens whose K (coding frame) / V are
    ``key``/``value`` ``[T, H, D]`` (streams without prediction): every code equal, except at
    most ``max_fraction`` of them one level away where the codec's ``z`` lies within float32
    rounding (1e-4 relative) of the decision threshold between the two. Returns how many differ."""
    flips = 0
    for stream, x in (("key", key), ("value", value)):
        a, b = stream_codes(got, params, stream), stream_codes(exp, params, stream)
        differ = a != b
        assert differ.float().mean().item() <= max_fraction, f"{stream}: {int(differ.sum())} codes differ"
        assert ((a - b).abs()[differ] == 1).all()
        p = getattr(params, stream)
        z = torch.einsum("thd,hde->the", x.float().cpu() - p.mean.cpu(), p.basis.cpu())
        between = p.cuts.cpu()[(p.level_start.cpu().long() + torch.minimum(a, b))]
        assert ((z - between).abs()[differ] <= 1e-4 * (1 + z.abs()[differ])).all()
        flips += int(differ.sum())
    return flips
