"""Which cached rows one attention call reads, grouped so that each group is decoded at once.

A batch's sequences are read in chunks of whole sequences, each chunk one codec (or kernel)
call per layer instead of one per sequence. NOTE: a chunk depends only on the batch's
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
    """Cached positions ``0 .. seq_len - 1`` of the sequences ``seqs``, one after another.

    ``blocks [M]``: the sequences' blocks, concatenated; ``rows [R]`` (R = sum of seq_lens):
    each read position as an index into those blocks' ``M * block_size`` slots;
    ``positions [R]``: its position in its sequence. Both on the cache's device.
    ``starts``: where each sequence's rows begin (``len(seqs) + 1`` entries).
    """

    seqs: list[int]
    seq_lens: list[int]
    first_blocks: list[int]
    starts: list[int]
    blocks: torch.Tensor
    rows: torch.Tensor
    positions: torch.Tensor
    key: tuple
    block_size: int

    def slots(self, pages: torch.Tensor) -> torch.Tensor:
        """The read rows' slot bytes ``[R, H, S]`` of ``pages [N, H, block_size, S]``."""
        return pages[self.blocks[self.rows // self.block_size], :, self.rows % self.block_size]


def plan_reads(seqs: list[int], seq_lens: list[int], block_table: torch.Tensor,
               block_table_host: torch.Tensor, block_size: int,
               rows_per_chunk: int = ROWS_PER_CHUNK) -> list[ReadChunk]:
    """Chunks of whole sequences (batch order) of at most ``rows_per_chunk`` rows each (a longer
    sequence alone). ``seq_lens``/``block_table [B, max_blocks]`` cover the whole batch;
    ``seqs`` picks the sequences read."""
    groups: list[list[int]] = []
    rows = 0
    for i in seqs:
        if not groups or (groups[-1] and rows + seq_lens[i] > rows_per_chunk):
            groups.append([])
            rows = 0
        groups[-1].append(i)
        rows += seq_lens[i]
    return [_chunk(group, seq_lens, block_table, block_table_host, block_size) for group in groups]


def _chunk(seqs, seq_lens, block_table, block_table_host, block_size) -> ReadChunk:
    lengths = [seq_lens[i] for i in seqs]
    counts = [-(-n // block_size) for n in lengths]
    width = block_table.shape[1]
    table_index = torch.cat([i * width + torch.arange(n) for i, n in zip(seqs, counts)])
    block_starts = torch.tensor([0] + counts[:-1]).cumsum(0) * block_size
    positions = torch.cat([torch.arange(n) for n in lengths])
    rows = positions + torch.repeat_interleave(block_starts, torch.tensor(lengths))
    starts = torch.tensor([0] + lengths).cumsum(0).tolist()
    key = ("read",) + tuple((tuple(block_table_host[i, :n].tolist()), length)
                            for i, n, length in zip(seqs, counts, lengths))
    device = block_table.device
    return ReadChunk(
        seqs=list(seqs), seq_lens=lengths,
        first_blocks=[int(block_table_host[i, 0]) for i in seqs], starts=starts,
        blocks=block_table.reshape(-1)[table_index.to(device)].long(),
        rows=rows.to(device), positions=positions.to(device), key=key, block_size=block_size)
