"""The per-batch decode plan (vllm_seqkv/integration/decode_plan.py): which decoding sequences
share a prefix, and the log-sum-exp merge of two partial attentions."""

import pytest
import torch

from vllm_seqkv.integration import decode_plan
from vllm_seqkv.integration.decode_plan import FusedDecodes, merge_partial_attention, shared_prefixes

BS = 16


def _table(rows: list[list[int]]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32)


def test_sequences_with_the_same_leading_blocks_are_grouped(monkeypatch):
    monkeypatch.setattr(decode_plan, "MIN_SHARED_POSITIONS", 3 * BS)
    common = [7, 8, 9, 10]
    table = _table([common + [20, 21], [30, 31, 32, 33], common[:3] + [40], common + [50], [60]])
    lens = [6 * BS, 4 * BS, 4 * BS - 3, 5 * BS, 3]
    groups = shared_prefixes(table, lens, BS)
    # rows 0, 2, 3 share blocks 7, 8, 9 (row 2 has a fourth block of its own); row 1 shares nothing
    assert groups == [([0, 2, 3], 3)]


def test_a_prefix_ends_before_every_sharers_own_position(monkeypatch):
    monkeypatch.setattr(decode_plan, "MIN_SHARED_POSITIONS", BS)
    table = _table([[1, 2, 3], [1, 2, 3]])
    # the second sequence's own token sits in block 3's first slot: its cached positions end at block 2
    assert shared_prefixes(table, [3 * BS, 2 * BS + 1], BS) == [([0, 1], 2)]
    assert shared_prefixes(table, [3 * BS, 2 * BS], BS) == [([0, 1], 1)]


def test_short_or_unshared_prefixes_are_not_worth_a_pass(monkeypatch):
    monkeypatch.setattr(decode_plan, "MIN_SHARED_POSITIONS", 4 * BS)
    table = _table([[1, 2, 3, 4, 5], [1, 2, 3, 6, 7]])
    assert shared_prefixes(table, [5 * BS, 5 * BS], BS) == []  # 3 shared blocks < 4
    # positions x (sharers - 1) below the saving asked for
    same = _table([[1, 2, 3, 4, 5]] * 3)
    assert shared_prefixes(same, [5 * BS] * 3, BS, min_saved_positions=8 * BS + 1) == []
    assert shared_prefixes(same, [5 * BS] * 3, BS, min_saved_positions=8 * BS) == [([0, 1, 2], 4)]
    monkeypatch.setattr(decode_plan, "MIN_SHARERS", 3)
    assert shared_prefixes(_table([[1, 2, 3, 4, 5]] * 2), [5 * BS] * 2, BS) == []


def test_fused_decodes_split_the_batch_into_alone_and_shared(monkeypatch):
    monkeypatch.setattr(decode_plan, "MIN_SHARED_POSITIONS", 2 * BS)
    # batch: a prefill (3 tokens), then four decodes; decodes 1 and 3 of the batch share two blocks
    starts = [0, 3, 4, 5, 6, 7]
    table = _table([[9, 9, 9], [1, 2, 3], [4, 5, 6], [1, 2, 8], [11, 12, 13]])
    lens = [40, 3 * BS, 3 * BS, 3 * BS - 2, 2 * BS + 5]
    plan = FusedDecodes.of(starts, lens, table, table, [1, 2, 3, 4], BS)
    assert plan.seqs == [1, 2, 3, 4]
    assert len(plan.shared) == 1
    shared = plan.shared[0]
    assert shared.length == 2 * BS and shared.first_block == 1
    assert shared.block_table.tolist() == [[1, 2]]
    assert torch.equal(shared.part.rows, torch.tensor([3, 5])) and shared.part.seq_lens == [3 * BS, 3 * BS - 2]
    assert shared.part.block_table.tolist() == [[1, 2, 3], [1, 2, 8]]
    alone = plan.alone
    assert torch.equal(alone.rows, torch.tensor([4, 6])) and alone.first_blocks == [4, 11]
    assert FusedDecodes.of(starts, lens, table, table, [1, 2, 3, 4], BS, None).shared == []
    # 2 * BS positions saved once (2 sharers): below a threshold of 2 * BS + 1, not shared
    assert FusedDecodes.of(starts, lens, table, table, [1, 2, 3, 4], BS, 2 * BS + 1).shared == []


@pytest.mark.parametrize("split", [1, 7, 19])
def test_merge_of_two_partial_attentions_is_attention_over_both(split):
    gen = torch.Generator().manual_seed(split)
    query = torch.randn(3, 4, 8, generator=gen)
    key, value = torch.randn(3, 20, 4, 8, generator=gen) * 2, torch.randn(3, 20, 4, 8, generator=gen)

    def attention(k, v):
        scores = torch.einsum("bhd,bshd->bhs", query, k) * 0.5
        return torch.einsum("bhs,bshd->bhd", scores.softmax(-1), v), scores.logsumexp(-1)

    head, head_lse = attention(key[:, :split], value[:, :split])
    rest, rest_lse = attention(key[:, split:], value[:, split:])
    torch.testing.assert_close(merge_partial_attention(head, head_lse, rest, rest_lse), attention(key, value)[0])
