"""Which cached rows one attention call reads, grouped so that each group is decoded at once.

A batch's sequences are read in chunks of whole sequences, each chunk one codec (or kernel)
call per layer instead of one per sequence, and each slot decoded once however many of the
chunk's sequences share it. NOTE: a chunk depends only on the batch's
metadata and the sequences asked for, so every layer of a forward pass builds the same
chunks in the same order, and a cross-layer hand-up (:class:`~.engine_codec.LayerChain`)
finds the layer below's reconstruction under the chunk's ``key``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROWS_PER_CHUNK = 1 << 15  # bounds the float32 K/V a chunk holds: rows x H x D x 8 bytes per layer


@dataclass(frozen=True)
class ReadChunk:
    """Cached positions ``first_positions[j] .. seq_len - 1`` of the sequences ``seqs`` (first
    position 0, or the start of a sliding window: earlier blocks may have been freed).

    Decoded once per distinct slot: ``blocks [M]`` the distinct blocks the sequences read,
    ``rows [U]`` each distinct slot read as an index into those blocks' ``M * block_size``
    slots, ``positions [U]`` its position in its sequence(s). ``gather [R]`` (R = sum of
    seq_lens) lays them out per sequence, one after another; sequence ``j``'s rows begin at
    ``starts[j]`` (``len(seqs) + 1`` entries). ``block_positions [M]``: the position of each
    block's first slot (a kernel rotates keys by position from it). Tensors on the cache's device.

    NOTE: sequences sharing a block (vLLM's prefix caching) share its slots, decoded once; a
    shared block sits at the same block index in every sequence that holds it (its hash
    chains from the first block), so a slot has one position.
    """

    seqs: list[int]
    first_positions: list[int]
    first_blocks: list[int]
    starts: list[int]
    blocks: torch.Tensor
    rows: torch.Tensor
    positions: torch.Tensor
    gather: torch.Tensor
    key: tuple
    block_size: int
    block_positions: torch.Tensor | None = None

    def slots(self, pages: torch.Tensor) -> torch.Tensor:
        """The distinct slots' bytes ``[U, H, S]`` of ``pages [N, H, block_size, S]``."""
        return gather_slots(pages, self.blocks, self.rows)


def gather_slots(pages: torch.Tensor, blocks: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Slots ``[R, H, S]`` of ``pages [N, H, bs, S]`` at ``rows [R]``, indices into the
    ``M * bs`` slots of ``blocks [M]``."""
    block_size = pages.shape[2]
    return pages[blocks[rows // block_size], :, rows % block_size]


def plan_reads(seqs: list[int], seq_lens: list[int], block_table_host: torch.Tensor,
               block_size: int, device=None, rows_per_chunk: int = ROWS_PER_CHUNK,
               first_positions: list[int] | None = None) -> list[ReadChunk]:
    """Chunks of whole sequences (batch order) of at most ``rows_per_chunk`` rows each (a longer
    sequence alone), their tensors on ``device``. ``seq_lens``/``block_table_host [B,
    max_blocks]`` (host) and ``first_positions`` (first position read, default 0) cover the
    whole batch; ``seqs`` picks the sequences read."""
    firsts = first_positions or [0] * len(seq_lens)
    groups: list[list[int]] = []
    rows = 0
    for i in seqs:
        if not groups or (groups[-1] and rows + seq_lens[i] - firsts[i] > rows_per_chunk):
            groups.append([])
            rows = 0
        groups[-1].append(i)
        rows += seq_lens[i] - firsts[i]
    return [_chunk(group, seq_lens, firsts, block_table_host, block_size, device) for group in groups]


def _chunk(seqs, seq_lens, firsts, block_table_host, block_size, device) -> ReadChunk:
    lengths = [seq_lens[i] - firsts[i] for i in seqs]
    counts = [-(-seq_lens[i] // block_size) for i in seqs]
    positions = torch.cat([torch.arange(firsts[i], seq_lens[i]) for i in seqs])
    index = torch.repeat_interleave(torch.tensor(seqs), torch.tensor(lengths))
    slots = block_table_host[index, positions // block_size].long() * block_size + positions % block_size
    distinct, gather = torch.unique(slots, return_inverse=True)  # sorted slot ids
    blocks, block_of = torch.unique(distinct // block_size, return_inverse=True)
    unique_positions = torch.zeros_like(distinct).scatter_(0, gather, positions)
    block_positions = torch.zeros_like(blocks).scatter_(0, block_of, unique_positions - distinct % block_size)
    key = ("read",) + tuple((tuple(block_table_host[i, :n].tolist()), length, firsts[i])
                            for i, n, length in zip(seqs, counts, lengths))
    return ReadChunk(
        seqs=list(seqs),
        first_positions=[firsts[i] for i in seqs],
        first_blocks=[int(block_table_host[i, 0]) for i in seqs],
        starts=torch.tensor([0] + lengths).cumsum(0).tolist(),
        blocks=blocks.to(device), rows=(block_of * block_size + distinct % block_size).to(device),
        positions=unique_positions.to(device), gather=gather.to(device), key=key,
        block_size=block_size, block_positions=block_positions.to(device))
