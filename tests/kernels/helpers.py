"""Shared builders: a seqkv-3-rot layer with a synthetic calibration, filled paged caches."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_seqkv.codec import make_codec
from vllm_seqkv.codec.base import SlotLayout
from vllm_seqkv.codec.calibration import Calibration, ChannelMoments
from vllm_seqkv.kernels import layer_params
from vllm_seqkv.kernels.reference import write_slots_reference

# per input dtype: (atol, rtol) of kernel output vs the fp32 reference on the same inputs
TOLERANCES = {torch.float32: (2e-4, 2e-4), torch.bfloat16: (2e-2, 2e-2)}


def seqkv3_layout(heads: int, dim: int, seed: int = 0) -> SlotLayout:
    """The "seqkv-3-rot" preset (K 4/3 bits, V 2/2 bits, calibrated predictor) for layer 0."""
    gen = torch.Generator().manual_seed(seed)
    moments = ChannelMoments.zeros(1, heads, dim)
    offset = torch.randn(heads, dim, generator=gen) * 3
    moments.add(0, offset + torch.randn(64, heads, dim, generator=gen))
    sens = torch.rand(1, heads, dim, generator=gen) + 0.1
    calibration = Calibration.fit("synthetic", moments, moments, sens, sens)
    key, value = make_codec("seqkv-3-rot", calibration).codecs_for_layer(0)
    return SlotLayout(key, value, heads, dim)


@dataclass
class PagedCache:
    """A compressed paged cache holding ``seq_lens`` tokens per sequence in shuffled blocks."""

    layout: SlotLayout
    pages: torch.Tensor  # uint8 [N, H, bs, S]
    block_table: torch.Tensor  # int32 [B, max_blocks]
    seq_lens: torch.Tensor  # int32 [B]

    @property
    def params(self):
        return layer_params(self.layout, self.pages.device)


def build_cache(seq_lens: list[int], heads: int, dim: int, block_size: int, device, seed: int = 0,
                extra_blocks: int = 2) -> PagedCache:
    gen = torch.Generator().manual_seed(seed)
    layout = seqkv3_layout(heads, dim, seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    max_blocks = max(blocks_per_seq)
    total = sum(blocks_per_seq) + extra_blocks
    pages = torch.randint(0, 256, (total, heads, block_size, layout.slot_bytes), generator=gen,
                          dtype=torch.uint8)
    order = torch.randperm(total, generator=gen)
    block_table = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    used = 0
    for i, (length, count) in enumerate(zip(seq_lens, blocks_per_seq)):
        block_table[i, :count] = order[used:used + count]
        used += count
        pos = torch.arange(length)
        slots = block_table[i, pos // block_size].long() * block_size + pos % block_size
        k, v = (layout.key.predictor.mean + torch.randn(length, heads, dim, generator=gen) for _ in range(2))
        write_slots_reference(k, v, slots, pages, layout)
    return PagedCache(layout, pages.to(device), block_table.to(device),
                      torch.tensor(seq_lens, dtype=torch.int32, device=device))
