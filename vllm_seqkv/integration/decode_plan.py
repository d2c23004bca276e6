"""What the one-token sequences of a batch need from the fused decode, planned once per batch.

Every layer of a step (of one KV-cache group) reads the same sequences, so the plan is built by
the first layer and reused: the query rows, lengths, the block table cut to the longest
sequence, and the shared prefixes. A shared prefix is a run of leading blocks that several
decoding sequences hold in common (prefix caching gives many chats the same system prompt);
its positions are read once for all of them (one pass with the sequences' queries stacked as
one wide GQA group, no own token), the rest of each sequence by the usual fused decode from
the prefix's end, and the two merged by their log-sum-exps (cascade attention, as vLLM's GPU
backends and FlashInfer do for shared prefixes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# NOTE: a prefix is read once for its sharers only when that pays for the extra op call and
# merge per layer and for the wider pass: at least 2 sharers, this many shared positions, and
# the config's shared_prefix_min_saved_positions (shared positions x (sharers - 1)), measured
# in BENCHMARKS.md, "Shared prefixes"
MIN_SHARERS = 2
MIN_SHARED_POSITIONS = 256


@dataclass
class DecodePart:
    """Some of the batch's one-query sequences: their query rows ``[n]`` (a slice when they are
    consecutive: a view, no gather), ``seq_lens`` (host list and int32 tensor), the block table
    cut to the longest one's blocks ``[n, m]`` and each one's first block (the sink table's key)."""

    rows: torch.Tensor | slice
    seq_lens: list[int]
    lengths: torch.Tensor
    block_table: torch.Tensor
    first_blocks: list[int]

    @classmethod
    def of(cls, query_rows: list[int], seq_lens: list[int], block_table: torch.Tensor,
           first_blocks: list[int], block_size: int | None) -> "DecodePart":
        device = block_table.device
        if block_size:
            block_table = block_table[:, :-(-max(seq_lens) // block_size)]
        consecutive = query_rows == list(range(query_rows[0], query_rows[0] + len(query_rows)))
        rows = (slice(query_rows[0], query_rows[0] + len(query_rows)) if consecutive
                else torch.tensor(query_rows, device=device))
        return cls(rows, seq_lens, torch.tensor(seq_lens, dtype=torch.int32, device=device), block_table,
                   first_blocks)

    def __len__(self) -> int:
        return len(self.seq_lens)


@dataclass
class SharedPrefix:
    """The first ``length`` positions (whole blocks, ``block_table [1, length / bs]``) of every
    sequence of ``part``, held in the same blocks; ``first_block`` keys their sink rows."""

    part: DecodePart
    length: int
    block_table: torch.Tensor
    first_block: int


@dataclass
class FusedDecodes:
    """A batch's one-query sequences ``seqs`` (batch indices): ``alone`` read by one fused decode
    each step, ``shared`` by a prefix pass + a fused decode of the rest (see the module)."""

    seqs: list[int]
    alone: DecodePart | None
    shared: list[SharedPrefix]

    @classmethod
    def of(cls, query_starts: list[int], seq_lens_host: list[int], block_table: torch.Tensor,
           block_table_host: torch.Tensor, seqs: list[int], block_size: int | None,
           min_saved_positions: int | None = 0) -> "FusedDecodes":
        """``min_saved_positions``: see :func:`shared_prefixes`; None plans no shared prefix."""
        groups = (shared_prefixes(block_table_host, [seq_lens_host[i] for i in seqs], block_size, seqs,
                                  min_saved_positions)
                  if block_size and min_saved_positions is not None else [])
        grouped = {member for members, _ in groups for member in members}

        def part(members: list[int]) -> DecodePart:
            batch = [seqs[j] for j in members]
            return DecodePart.of([query_starts[i] for i in batch], [seq_lens_host[i] for i in batch],
                                 block_table[batch], block_table_host[batch, 0].tolist(), block_size)

        alone = [j for j in range(len(seqs)) if j not in grouped]
        shared = []
        for members, blocks in groups:
            shared.append(SharedPrefix(part(members), blocks * block_size,
                                       block_table[seqs[members[0]]][None, :blocks],
                                       int(block_table_host[seqs[members[0]], 0])))
        return cls(seqs, part(alone) if alone else None, shared)


def shared_prefixes(block_table_host: torch.Tensor, seq_lens: list[int], block_size: int,
                    seqs: list[int] | None = None, min_saved_positions: int = 0) -> list[tuple[list[int], int]]:
    """Groups of the sequences (indices into ``seq_lens``; rows ``seqs`` of the host block table,
    default ``0 .. n - 1``) whose leading blocks are the same: ``(members, blocks)`` with at least
    :data:`MIN_SHARERS` members, :data:`MIN_SHARED_POSITIONS` positions and ``positions x
    (members - 1) >= min_saved_positions``, ``blocks`` whole blocks that end before each member's
    own position (``blocks * bs <= seq_len - 1``)."""
    rows = seqs if seqs is not None else list(range(len(seq_lens)))
    by_first: dict[int, list[int]] = {}
    for j, row in enumerate(rows):
        by_first.setdefault(int(block_table_host[row, 0]), []).append(j)
    groups = []
    for members in by_first.values():
        if len(members) < MIN_SHARERS:
            continue
        most = min(seq_lens[j] - 1 for j in members) // block_size
        if most * block_size < MIN_SHARED_POSITIONS:
            continue
        table = block_table_host[[rows[j] for j in members], :most]
        same = (table == table[0]).all(0)
        blocks = int(same.cumprod(0).sum())
        positions = blocks * block_size
        if positions >= MIN_SHARED_POSITIONS and positions * (len(members) - 1) >= min_saved_positions:
            groups.append((members, blocks))
    return groups


def stack_sharers(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Queries ``[n, Hq, D]`` of n sequences as one sequence's wide GQA group
    ``[1, H * n * G, D]`` (per KV head: the n sequences' G heads), contiguous."""
    sharers, q_heads, dim = query.shape
    group = q_heads // kv_heads
    return query.view(sharers, kv_heads, group, dim).transpose(0, 1).reshape(1, -1, dim).contiguous()


def unstack_sharers(out: torch.Tensor, lse: torch.Tensor, sharers: int, kv_heads: int):
    """The inverse of :func:`stack_sharers` for a pass's ``out [1, H * n * G, D]`` and
    ``lse [1, H * n * G]`` -> ``[n, Hq, D]``, ``[n, Hq]``."""
    dim = out.shape[-1]
    group = out.shape[1] // (kv_heads * sharers)
    out = out.view(kv_heads, sharers, group, dim).transpose(0, 1).reshape(sharers, kv_heads * group, dim)
    return out, lse.view(kv_heads, sharers, group).transpose(0, 1).reshape(sharers, kv_heads * group)


def merge_partial_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                            lse_b: torch.Tensor) -> torch.Tensor:
    """Attention over two disjoint sets of positions merged: outputs ``[B, Hq, D]`` normalised
    over their own set, ``lse [B, Hq]`` the logs of their softmax denominators."""
    top = torch.maximum(lse_a, lse_b)
    weight_a, weight_b = (lse_a - top).exp_(), (lse_b - top).exp_()
    total = weight_a + weight_b
    return (out_a * (weight_a / total)[..., None]).add_(out_b * (weight_b / total)[..., None])
