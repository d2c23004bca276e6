"""Chunks of sequences the backend decodes in one call (no vLLM)."""

import torch

from vllm_seqkv.integration.reads import plan_reads

BLOCK = 4
# sequences 0 and 2 share their first block (vLLM's prefix caching), 1 and 3 do not
TABLE = torch.tensor([[7, 2, 0], [5, 0, 0], [7, 3, 6], [4, 0, 0]], dtype=torch.int32)
LENGTHS = [6, 3, 9, 1]


def per_sequence_slots(seqs):
    return [int(TABLE[b, p // BLOCK]) * BLOCK + p % BLOCK for b in seqs for p in range(LENGTHS[b])]


def test_each_slot_is_decoded_once_and_laid_out_per_sequence():
    (chunk,) = plan_reads([0, 1, 2, 3], LENGTHS, TABLE, BLOCK)
    assert chunk.seqs == [0, 1, 2, 3] and chunk.starts == [0, 6, 9, 18, 19]
    assert sorted(chunk.blocks.tolist()) == [2, 3, 4, 5, 6, 7]
    pages = torch.arange(8 * BLOCK).view(8, 1, BLOCK, 1)  # slot value = its global slot number
    distinct = chunk.slots(pages).flatten()
    assert distinct.numel() == len(set(per_sequence_slots([0, 1, 2, 3]))) == 19 - 4
    assert distinct[chunk.gather].tolist() == per_sequence_slots([0, 1, 2, 3])
    positions = chunk.positions[chunk.gather].tolist()
    assert positions == [p for n in LENGTHS for p in range(n)]
    assert chunk.first_blocks == [7, 5, 7, 4]
    # each block's first slot position: its index in the sequences' block tables times the block size
    starts = dict(zip(chunk.blocks.tolist(), chunk.block_positions.tolist()))
    assert starts == {7: 0, 5: 0, 4: 0, 2: 4, 3: 4, 6: 8}
    assert torch.equal(chunk.positions, chunk.block_positions[chunk.rows // BLOCK] + chunk.rows % BLOCK)


def test_chunks_hold_whole_sequences_within_the_row_bound():
    chunks = plan_reads([0, 1, 2, 3], LENGTHS, TABLE, BLOCK, rows_per_chunk=8)
    assert [c.seqs for c in chunks] == [[0], [1], [2], [3]]  # 6+3 > 8; 9 alone (longer than 8)
    chunks = plan_reads([0, 1, 2, 3], LENGTHS, TABLE, BLOCK, rows_per_chunk=10)
    assert [c.seqs for c in chunks] == [[0, 1], [2, 3]]
    pages = torch.arange(8 * BLOCK).view(8, 1, BLOCK, 1)
    for chunk in chunks:
        assert chunk.gather.numel() == chunk.starts[-1]
        assert chunk.slots(pages).flatten()[chunk.gather].tolist() == per_sequence_slots(chunk.seqs)


def test_a_chunk_key_names_its_blocks_and_lengths_so_every_layer_finds_the_same_hand_up():
    first = plan_reads([1, 3], LENGTHS, TABLE, BLOCK)[0].key
    assert first == plan_reads([1, 3], LENGTHS, TABLE, BLOCK)[0].key
    assert first != plan_reads([1, 3], [3, 2, 9, 1], TABLE, BLOCK)[0].key
    assert first != plan_reads([1], LENGTHS, TABLE, BLOCK)[0].key


def test_no_sequence_read_gives_no_chunk():
    assert plan_reads([], LENGTHS, TABLE, BLOCK) == []


def test_the_batch_metadata_plans_each_read_once_for_every_layer():
    from vllm_seqkv.integration.backend import SeqKVMetadata

    metadata = SeqKVMetadata(
        num_actual_tokens=4, query_start_loc=None, seq_lens=None, block_table=TABLE,
        slot_mapping=None, positions=None, query_starts=[0, 1, 2, 3, 4], seq_lens_host=LENGTHS,
        block_table_host=TABLE)
    plan = metadata.plan_reads([0, 2], BLOCK, None)
    assert metadata.plan_reads([0, 2], BLOCK, None) is plan
    assert metadata.plan_reads([1], BLOCK, None) is not plan
    assert [c.seqs for c in plan] == [[0, 2]]


def test_a_sliding_window_reads_from_its_first_position_and_never_a_freed_block():
    """Sequence 2 read from position 5: its first block (freed by vLLM: null block 0 here) is
    not read; the others from position 0."""
    table = TABLE.clone()
    table[2, 0] = 0
    (chunk,) = plan_reads([0, 2], LENGTHS, table, BLOCK, first_positions=[0, 0, 5, 0])
    assert chunk.first_positions == [0, 5] and chunk.starts == [0, 6, 10]
    assert 0 not in chunk.blocks.tolist()
    assert chunk.positions[chunk.gather].tolist() == list(range(6)) + list(range(5, 9))
