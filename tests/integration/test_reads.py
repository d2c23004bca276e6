"""Chunks of sequences the backend decodes in one call (no vLLM)."""

import torch

from vllm_seqkv.integration.reads import plan_reads

BLOCK = 4
TABLE = torch.tensor([[7, 2, 0], [5, 0, 0], [1, 3, 6], [4, 0, 0]], dtype=torch.int32)
LENGTHS = [6, 3, 9, 1]


def test_rows_address_each_sequence_positions_in_its_blocks():
    (chunk,) = plan_reads([0, 1, 2, 3], LENGTHS, TABLE, TABLE, BLOCK)
    assert chunk.seqs == [0, 1, 2, 3] and chunk.starts == [0, 6, 9, 18, 19]
    assert chunk.blocks.tolist() == [7, 2, 5, 1, 3, 6, 4]
    pages = torch.arange(8 * BLOCK).view(8, 1, BLOCK, 1)  # slot value = its global slot number
    expected = [int(TABLE[b, p // BLOCK]) * BLOCK + p % BLOCK
                for b, n in enumerate(LENGTHS) for p in range(n)]
    assert chunk.slots(pages).flatten().tolist() == expected
    assert chunk.positions.tolist() == [p for n in LENGTHS for p in range(n)]
    assert chunk.first_blocks == [7, 5, 1, 4]


def test_chunks_hold_whole_sequences_within_the_row_bound():
    chunks = plan_reads([0, 1, 2, 3], LENGTHS, TABLE, TABLE, BLOCK, rows_per_chunk=8)
    assert [c.seqs for c in chunks] == [[0], [1], [2], [3]]  # 6+3 > 8; 9 alone (longer than 8)
    chunks = plan_reads([0, 1, 2, 3], LENGTHS, TABLE, TABLE, BLOCK, rows_per_chunk=10)
    assert [c.seqs for c in chunks] == [[0, 1], [2, 3]]
    for chunk in chunks:
        lengths = [LENGTHS[i] for i in chunk.seqs]
        assert chunk.rows.numel() == sum(lengths) == chunk.starts[-1]


def test_a_chunk_key_names_its_blocks_and_lengths_so_every_layer_finds_the_same_hand_up():
    first = plan_reads([1, 3], LENGTHS, TABLE, TABLE, BLOCK)[0].key
    assert first == plan_reads([1, 3], LENGTHS, TABLE, TABLE, BLOCK)[0].key
    assert first != plan_reads([1, 3], [3, 2, 9, 1], TABLE, TABLE, BLOCK)[0].key
    assert first != plan_reads([1], LENGTHS, TABLE, TABLE, BLOCK)[0].key


def test_no_sequence_read_gives_no_chunk():
    assert plan_reads([], LENGTHS, TABLE, TABLE, BLOCK) == []
