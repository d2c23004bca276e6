"""Pieces of the backend that need no engine: metadata, backend selection rules, token
positions and the exact sink table."""


import pytest
import torch

from vllm_seqkv.codec.token_table import TokenTableCodec
from vllm_seqkv.integration import backend as backend_module
from vllm_seqkv.integration.backend import SeqKVAttentionBackend, SeqKVMetadataBuilder, token_positions
from vllm_seqkv.integration.compat import CommonAttentionMetadata
from vllm_seqkv.integration.engine_codec import SinkTable


def test_positions_of_a_mixed_batch():
    # request 0: decode at position 9; request 1: prefill of 3 tokens; request 2: chunk 5..6;
    # then two padding tokens
    assert token_positions([0, 1, 4, 6], [10, 3, 7], 8).tolist() == [9, 0, 1, 2, 5, 6, 0, 0]


def test_metadata_builder_keeps_host_copies_and_drops_padding_requests():
    common = CommonAttentionMetadata(
        query_start_loc=torch.tensor([0, 1, 4, 4], dtype=torch.int32),
        query_start_loc_cpu=torch.tensor([0, 1, 4, 4], dtype=torch.int32),
        seq_lens=torch.tensor([10, 3, 0], dtype=torch.int32), num_reqs=2, num_actual_tokens=5,
        max_query_len=3, max_seq_len=10,
        block_table_tensor=torch.tensor([[4, 2], [7, 0], [0, 0]], dtype=torch.int32),
        slot_mapping=torch.tensor([66, 112, 113, 114, -1]))
    builder = SeqKVMetadataBuilder.__new__(SeqKVMetadataBuilder)
    metadata = builder.build(0, common)
    assert metadata.query_starts == [0, 1, 4] and metadata.seq_lens_host == [10, 3]
    assert metadata.block_table_host.tolist() == [[4, 2], [7, 0]]
    assert metadata.positions.tolist() == [9, 0, 1, 2, 0]
    assert metadata.slot_mapping is common.slot_mapping


def _selector_reasons(**overrides):
    from vllm.platforms.interface import DeviceCapability

    config = dict(head_size=64, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=32,
                  use_mla=False, has_sink=False, use_sparse=False, use_mm_prefix=False,
                  use_per_head_quant_scales=False, device_capability=DeviceCapability(9, 0),
                  attn_type="decoder")
    return SeqKVAttentionBackend.validate_configuration(**{**config, **overrides})


def test_backend_passes_vllms_gpu_selector_checks_for_a_supported_model():
    # what vLLM's CUDA platform runs on the backend registered in the CUSTOM slot
    assert _selector_reasons() == []
    assert _selector_reasons(block_size=64, dtype=torch.float16, head_size=128) == []
    assert SeqKVAttentionBackend.get_preferred_block_size(16) == 32


@pytest.mark.parametrize("override, reason", [
    ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype"),
    ({"head_size": 80}, "head_size"),
    ({"use_mla": True}, "MLA"),
    ({"attn_type": "encoder"}, "attention type"),
    ({"block_size": 16}, "block_size"),
])
def test_backend_refuses_what_it_cannot_store(override, reason):
    assert any(reason in r for r in _selector_reasons(**override))


def test_backend_passes_vllms_selector_checks_with_sliding_windows():
    assert _selector_reasons(has_sliding_window=True) == []


def test_backend_name_is_the_slot_it_takes(monkeypatch):
    from vllm_seqkv.integration.compat import AttentionBackendEnum

    assert SeqKVAttentionBackend.get_name() == "CPU_ATTN"  # vLLM looks the name up in the enum
    monkeypatch.setattr(backend_module, "backend_slot", lambda: AttentionBackendEnum.CUSTOM)
    assert SeqKVAttentionBackend.get_name() == "CUSTOM"


def test_sink_table_restores_only_sequence_starts():
    table = SinkTable(sink_tokens=1)
    key, value = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    blocks, offsets = torch.tensor([7, 7, 8]), torch.tensor([0, 1, 0])
    table.record(0, blocks, offsets, torch.tensor([0, 1, 32]), key, value)
    k, v = torch.zeros(2, 2, 4), torch.zeros(2, 2, 4)
    table.restore(0, 7, k, v)
    torch.testing.assert_close(k[0], key[0])
    assert k[1].abs().sum() == 0
    k8 = torch.zeros(1, 2, 4)
    table.restore(0, 8, k8, torch.zeros(1, 2, 4))  # block 8 starts at position 32: no sink
    assert k8.abs().sum() == 0
    table.record(0, torch.tensor([7]), torch.tensor([0]), torch.tensor([64]), key[:1], value[:1])
    k7 = torch.zeros(1, 2, 4)
    table.restore(0, 7, k7, torch.zeros(1, 2, 4))  # block 7 reused mid-sequence: entry dropped
    assert k7.abs().sum() == 0


def test_sink_table_gives_all_rows_only_when_it_knows_every_sink_position():
    table = SinkTable(sink_tokens=2)
    key, value = torch.randn(4, 2, 4), torch.randn(4, 2, 4)
    table.record(0, torch.tensor([7, 7, 9]), torch.tensor([0, 1, 0]), torch.tensor([0, 1, 0]),
                 key[:3], value[:3])
    assert table.all_rows(0, [7, 9]) is None  # block 9 holds only position 0 so far
    table.record(0, torch.tensor([9]), torch.tensor([1]), torch.tensor([1]), key[3:], value[3:])
    k, v = table.all_rows(0, [7, 9])
    assert k.shape == v.shape == (2, 2, 2, 4)
    for b, block in enumerate([7, 9]):  # the same rows restore() writes over decoded ones
        rk, rv = torch.zeros(2, 2, 4), torch.zeros(2, 2, 4)
        table.restore(0, block, rk, rv)
        assert torch.equal(k[b], rk) and torch.equal(v[b], rv)
    assert table.all_rows(1, [7]) is None  # another layer


def test_layer_chain_rebuilds_what_it_was_not_handed(tiny_model_dir):
    from vllm_seqkv.config import SeqKVConfig
    from vllm_seqkv.integration.engine_codec import EngineCodec

    engine = EngineCodec(SeqKVConfig(kv_cache_backend="seqkv", preset="seqkv-3"), str(tiny_model_dir), 2, 32, 10000.0)
    assert engine.codec.cross_layer
    gen = torch.Generator().manual_seed(0)
    blocks, offsets = torch.tensor([3, 3, 5]), torch.tensor([0, 1, 4])
    pages = [torch.zeros(8, 2, 16, engine.slot_bytes, dtype=torch.uint8) for _ in range(3)]

    def gather(p):
        return p[blocks, :, offsets]

    handed = []
    for layer, page in enumerate(pages):
        engine.chain.register(layer, page)
        previous = engine.chain.below(layer, ("w",), gather)
        layout = engine.layout(layer)
        if layer == 0:  # the token table: layer 0's K/V are rows of it
            assert isinstance(layout.key, TokenTableCodec)
            ids = torch.randint(0, layout.key.table.shape[0], (3,), generator=gen)
            key, value = layout.key.table[ids].float(), layout.value.table[ids].float()
        else:
            key, value = torch.randn(3, 2, 32, generator=gen) * 2, torch.randn(3, 2, 32, generator=gen)
        coded = layout.encode(key, value, previous)
        page[blocks, :, offsets, :layout.slot_bytes] = coded
        handed.append(layout.decode(coded, previous))
        engine.chain.keep(layer, ("w",), handed[-1])
    # nothing kept for this key: layers 0 and 1 are decoded again from their pages
    rebuilt = engine.chain.below(2, ("other",), gather)
    torch.testing.assert_close(rebuilt[0], handed[1][0])
    torch.testing.assert_close(rebuilt[1], handed[1][1])


def test_non_finite_kv_is_stored_as_zero_with_a_warning(monkeypatch):
    from vllm_seqkv.integration import backend

    warnings = []
    monkeypatch.setattr(backend.logger, "warning", lambda *a: warnings.append(a))
    key, value = torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    same_k, same_v = backend.finite_or_zero(key, value, 3)
    assert same_k is key and same_v is value and not warnings
    key[1, 0, 2], value[3, 1, 0] = float("nan"), float("-inf")
    k, v = backend.finite_or_zero(key, value, 3)
    assert torch.isfinite(k).all() and torch.isfinite(v).all()
    assert k[1, 0, 2] == 0 and v[3, 1, 0] == 0
    torch.testing.assert_close(k[0], key[0])
    (args,) = warnings
    assert args[1:] == (3, 2, 4)  # layer 3: 2 of 4 tokens


def test_sink_table_by_first_token_shares_one_entry_per_token():
    first = {7: 42, 8: 42, 9: 5}  # block -> token id at its offset 0
    table = SinkTable(sink_tokens=1, first_token=first.get)
    key, value = torch.randn(2, 2, 4), torch.randn(2, 2, 4)
    # two sequences starting with token 42 (blocks 7 and 8), one with token 5 (block 9)
    table.record(0, torch.tensor([7, 8]), torch.tensor([0, 0]), torch.tensor([0, 0]), key, value)
    table.record(0, torch.tensor([9]), torch.tensor([0]), torch.tensor([0]), key[1:], value[1:])
    assert len(table) == 2  # one entry per distinct first token, not per sequence
    k8 = torch.zeros(1, 2, 4)
    table.restore(0, 8, k8, torch.zeros(1, 2, 4))
    torch.testing.assert_close(k8[0], key[0])  # the first recorded value of token 42
    # block 7 reused mid-sequence: the token's entry stays (it does not belong to a block)
    table.record(0, torch.tensor([7]), torch.tensor([0]), torch.tensor([300]), key[1:], value[1:])
    first[7] = 99
    k7 = torch.zeros(1, 2, 4)
    table.restore(0, 7, k7, torch.zeros(1, 2, 4))
    assert k7.abs().sum() == 0 and len(table) == 2
    # a cold-tier record carries the entry; another engine's table installs it for the token
    other = SinkTable(sink_tokens=1, first_token={3: 5}.get)
    other.import_(0, 3, table.export(0, 9))
    k3 = torch.zeros(1, 2, 4)
    other.restore(0, 3, k3, torch.zeros(1, 2, 4))
    torch.testing.assert_close(k3[0], key[1])


@pytest.mark.parametrize("by_token", [True, False])
def test_sink_table_is_bounded_and_warns_once_when_full(by_token, caplog):
    entry = 2 * 2 * 4 * 4  # K and V [H=2, D=4] float32
    table = SinkTable(sink_tokens=1, first_token={b: b for b in range(10)}.get if by_token else None,
                      max_bytes=3 * entry)
    key, value = torch.randn(5, 2, 4), torch.randn(5, 2, 4)
    with caplog.at_level("WARNING", logger="vllm.seqkv"):
        table.record(0, torch.arange(5), torch.zeros(5, dtype=torch.long),
                     torch.zeros(5, dtype=torch.long), key, value)
    assert len(table) == 3 and table.nbytes == 3 * entry and table.refused == 2
    assert sum("sink table is full" in r.message for r in caplog.records) == 1
    k4 = torch.zeros(1, 2, 4)
    table.restore(0, 4, k4, torch.zeros(1, 2, 4))  # not kept: the coded row stays
    assert k4.abs().sum() == 0
    if not by_token:  # a block reused mid-sequence frees its entry: room for the next start
        table.record(0, torch.tensor([0]), torch.tensor([0]), torch.tensor([200]), key[:1], value[:1])
        table.record(0, torch.tensor([4]), torch.tensor([0]), torch.tensor([0]), key[4:], value[4:])
        assert len(table) == 3 and table.nbytes == 3 * entry
        table.restore(0, 4, k4, torch.zeros(1, 2, 4))
        torch.testing.assert_close(k4[0], key[4])


def test_engine_keys_sinks_by_the_token_in_layer0_slot(tiny_model_dir):
    from vllm_seqkv.config import SeqKVConfig
    from vllm_seqkv.integration.engine_codec import EngineCodec

    engine = EngineCodec(SeqKVConfig(kv_cache_backend="seqkv", preset="seqkv-3"), str(tiny_model_dir), 2, 32,
                         10000.0)
    assert engine.sinks.by_token and engine.first_token(0) is None  # no pages yet
    layout = engine.layout(0)
    table = layout.key.table
    pages = torch.zeros(4, 2, 16, engine.slot_bytes, dtype=torch.uint8)
    engine.chain.register(0, pages)
    ids = torch.tensor([17, 301])
    coded = layout.encode(table[ids].float(), layout.value.table[ids].float())
    pages[torch.tensor([2, 3]), :, 0, :layout.slot_bytes] = coded
    assert engine.first_token(2) == 17 and engine.first_token(3) == 301


@pytest.mark.parametrize("sink_table_bytes", [64 << 20, 0])  # exact sinks / coded (table full)
def test_fused_decode_equals_reconstruct_then_attend(tiny_model_dir, nox_calibration, sink_table_bytes):
    """EngineCodec.decode_attention (the fused kernel's contract: sinks skipped, merged back by
    the log-sum-exp; here its torch reference) against the backend's prefill path: reconstruct,
    RoPE, exact sinks, attend."""
    from vllm_seqkv.config import SeqKVConfig
    from vllm_seqkv.integration.backend import attend
    from vllm_seqkv.integration.engine_codec import EngineCodec
    from vllm_seqkv.integration.reads import plan_reads

    engine = EngineCodec(SeqKVConfig(kv_cache_backend="seqkv", preset="seqkv-3-nox",
                                     calibration=str(nox_calibration),
                                     sink_table_bytes=sink_table_bytes),
                         str(tiny_model_dir), 2, 32, 10000.0)
    gen = torch.Generator().manual_seed(1)
    block_size, lengths = 16, [1, 2, 5, 40]
    block_table = torch.tensor([[0, 0, 0], [1, 0, 0], [2, 0, 0], [3, 4, 5]])
    pages = [torch.zeros(6, 2, block_size, engine.slot_bytes, dtype=torch.uint8) for _ in range(2)]
    for layer, page in enumerate(pages):
        engine.chain.register(layer, page)
    exact, first_tokens = [], set()
    for b, length in enumerate(lengths):
        positions = torch.arange(length)
        slots = block_table[b, positions // block_size] * block_size + positions % block_size
        ids = torch.randint(0, 4000, (length,), generator=gen)
        first_tokens.add(int(ids[0]))
        table0 = engine.layout(0)
        engine.write(0, pages[0], slots, table0.key.table[ids].float(), table0.value.table[ids].float())
        key = torch.randn(length, 2, 32, generator=gen) * 2
        value = torch.randn(length, 2, 32, generator=gen)
        engine.write(1, pages[1], slots, engine.to_code_frame(key, positions), value)
        engine.sinks.record(1, slots // block_size, slots % block_size, positions, key, value)
        exact.append((key, value))
    assert len(engine.sinks) == (len(first_tokens) if sink_table_bytes else 0)  # keyed by token
    query = torch.randn(4, 6, 32, generator=gen)
    own_k = torch.stack([k[-1] for k, _ in exact])
    own_v = torch.stack([v[-1] for _, v in exact])
    params = engine.kernel_params(1, torch.device("cpu"))
    fused = engine.decode_attention(1, params, query, own_k, own_v, pages[1], block_table, lengths, 0.2)
    for b, length in enumerate(lengths):
        chunk = plan_reads([b], lengths, block_table, block_size)[0]
        cached_k, cached_v = engine.reconstruct(1, pages[1], chunk.blocks, chunk.rows, None)
        cached_k = engine.from_code_frame(cached_k, chunk.positions)[chunk.gather]
        cached_v = cached_v[chunk.gather]
        engine.sinks.restore(1, chunk.first_blocks[0], cached_k, cached_v)
        expected = attend(query[b:b + 1], cached_k, cached_v, own_k[b:b + 1], own_v[b:b + 1], 0.2)
        torch.testing.assert_close(fused[b], expected[0], atol=1e-4, rtol=1e-4)


def test_kv_update_positions_follow_a_padded_slot_mapping():
    from vllm_seqkv.integration.backend import _padded

    positions = torch.tensor([9, 0, 1])
    assert _padded(positions, 5).tolist() == [9, 0, 1, 0, 0]
    assert _padded(positions, 2).tolist() == [9, 0]


def test_shared_prefix_decode_equals_the_fused_decode(tiny_model_dir, nox_calibration):
    """EngineCodec.decode_shared_prefix (the shared blocks read once for all sharers, exact sink
    rows merged) + decode_attention(from_position) merged by the log-sum-exps = decode_attention
    of the whole sequences, on the codec's own pages."""
    from vllm_seqkv.config import SeqKVConfig
    from vllm_seqkv.integration.decode_plan import merge_partial_attention
    from vllm_seqkv.integration.engine_codec import EngineCodec

    engine = EngineCodec(SeqKVConfig(kv_cache_backend="seqkv", preset="seqkv-3-nox",
                                     calibration=str(nox_calibration)), str(tiny_model_dir), 2, 32, 10000.0)
    gen = torch.Generator().manual_seed(3)
    block_size, shared_blocks = 16, 3
    lengths = [3 * 16 + 1, 3 * 16 + 9, 5 * 16]
    block_table = torch.tensor([[0, 1, 2, 3, 9], [0, 1, 2, 4, 9], [0, 1, 2, 5, 6]])
    pages = torch.zeros(10, 2, block_size, engine.slot_bytes, dtype=torch.uint8)
    key = torch.randn(max(lengths), 2, 32, generator=gen) * 2
    for b, length in enumerate(lengths):
        positions = torch.arange(length)
        slots = block_table[b, positions // block_size] * block_size + positions % block_size
        tail = torch.randn(length, 2, 32, generator=gen) * 2
        k = torch.where((positions < shared_blocks * block_size)[:, None, None], key[:length], tail)
        engine.write(1, pages, slots, engine.to_code_frame(k, positions), k)
        engine.sinks.record(1, slots // block_size, slots % block_size, positions, k, k)
    query = torch.randn(3, 6, 32, generator=gen)
    own_k, own_v = torch.randn(3, 2, 32, generator=gen), torch.randn(3, 2, 32, generator=gen)
    params = engine.kernel_params(1, torch.device("cpu"))
    whole = engine.decode_attention(1, params, query, own_k, own_v, pages, block_table, lengths, 0.2)
    length = shared_blocks * block_size
    head, head_lse = engine.decode_shared_prefix(1, params, query, pages, block_table[:1, :shared_blocks], length,
                                                 0, 0.2)
    rest, rest_lse = engine.decode_attention(1, params, query, own_k, own_v, pages, block_table, lengths, 0.2,
                                             from_position=length)
    torch.testing.assert_close(merge_partial_attention(head, head_lse, rest, rest_lse), whole, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="sink positions"):
        engine.decode_attention(1, params, query, own_k, own_v, pages, block_table, lengths, 0.2, from_position=0)


def test_sink_rows_are_kept_in_the_model_dtype_and_read_back_bit_exact(tiny_model_dir):
    """The backend hands the sink table float32 copies of vLLM's bf16 K/V: the table keeps them
    in bf16 (half the bytes) and attention reads float32 rows equal to what it was handed."""
    from vllm_seqkv.config import SeqKVConfig
    from vllm_seqkv.integration.engine_codec import EngineCodec

    engine = EngineCodec(SeqKVConfig(kv_cache_backend="seqkv", preset="seqkv-f4"), str(tiny_model_dir), 2, 32,
                         10000.0, kv_dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(3)
    key, value = ((torch.randn(3, 2, 32, generator=gen) * 5).to(torch.bfloat16).float() for _ in range(2))
    engine.sinks.record(1, torch.tensor([4, 6, 9]), torch.zeros(3, dtype=torch.long),
                        torch.zeros(3, dtype=torch.long), key, value)
    assert engine.sinks.nbytes == 3 * 2 * 2 * 32 * 2  # bf16 K and V [H, D] per sequence start
    pages = torch.zeros(10, 2, 16, engine.slot_bytes, dtype=torch.uint8)
    sink_k, sink_v = engine.sink_rows(1, pages, [4, 6, 9])  # what the fused decode merges
    assert sink_k.dtype == sink_v.dtype == torch.float32
    assert torch.equal(sink_k[:, 0], key) and torch.equal(sink_v[:, 0], value)
    decoded_k, decoded_v = torch.zeros(1, 2, 32), torch.zeros(1, 2, 32)  # the prefill path's rows
    engine.sinks.restore(1, 6, decoded_k, decoded_v)
    assert torch.equal(decoded_k[0], key[1]) and torch.equal(decoded_v[0], value[1])
    # a cold tier's float32 record of the rows installs the same bf16 rows in another engine
    other = SinkTable(1, dtype=torch.bfloat16)
    other.import_(1, 2, {o: (k.float(), v.float()) for o, (k, v) in engine.sinks.export(1, 9).items()})
    k2, v2 = other.all_rows(1, [2])
    assert k2.dtype == torch.bfloat16 and torch.equal(k2[0, 0].float(), key[2])


def test_sink_table_by_first_token_drops_a_token_no_block_starts_with_any_more():
    """Entries by first token live while some block holds a sequence start with that token:
    at most one per block (what the KV budget reserves for them)."""
    first = {1: 42, 2: 42, 3: 5}  # block -> token id at its offset 0 (layer 0's slot)
    table = SinkTable(sink_tokens=1, first_token=first.get)
    key, value = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    zeros = torch.zeros(3, dtype=torch.long)
    for layer in range(2):  # the backend records every layer of a step
        table.record(layer, torch.tensor([1, 2, 3]), zeros, zeros, key, value)
    assert len(table) == 2 * 2  # tokens 42 and 5, two layers
    for layer in range(2):  # block 3 reused mid-sequence: no block starts with token 5
        table.record(layer, torch.tensor([3]), zeros[:1], torch.tensor([640]), key[:1], value[:1])
    assert len(table) == 2 and table.nbytes == 2 * 2 * 2 * 4 * 4
    first[1] = 7  # block 1 now starts a sequence with token 7; block 2 still starts with 42
    table.record(0, torch.tensor([1]), zeros[:1], zeros[:1], key[2:], value[2:])
    k = torch.zeros(1, 2, 4)
    table.restore(1, 2, k, torch.zeros(1, 2, 4))
    torch.testing.assert_close(k[0], key[0])  # token 42's entry stays: block 2 starts with it
    table.record(0, torch.tensor([2]), zeros[:1], torch.tensor([64]), key[:1], value[:1])
    assert sorted(table._exact) == [(0, 7)]  # 42 is gone from every layer
    # a cold-tier record with no sink rows over a start block ends its start
    table.import_(0, 1, {})
    assert len(table) == 0 and table.nbytes == 0


def test_decode_step_ops_write_and_attend_as_the_general_path(tiny_model_dir, monkeypatch):
    """A decode-only step on CPU goes through EngineCodec.decode_step_ops (the two C++ ops called
    straight): the same page bytes as EngineCodec.write_tokens and the same attention as
    EngineCodec.decode_attention (bf16 in and out: the float32 result rounded once), on mixed
    lengths with exact sink rows and the layer's own RoPE table; None where the C++ ops do not run."""
    from vllm_seqkv.codec.rope import default_table
    from vllm_seqkv.config import SeqKVConfig
    from vllm_seqkv.integration.engine_codec import EngineCodec
    from vllm_seqkv.kernels import KernelArgumentError, cpu_ops

    if not cpu_ops.load_cpu_ops():
        pytest.skip(f"C++ CPU ops not built: {cpu_ops.load_error()}")
    monkeypatch.setenv("SEQKV_KERNELS", "auto")
    engine = EngineCodec(SeqKVConfig(kv_cache_backend="seqkv", preset="seqkv-f4"), str(tiny_model_dir), 2, 32,
                         10000.0, kv_dtype=torch.bfloat16)
    engine.set_rope_table(1, default_table(256, 32, 10000.0))
    gen = torch.Generator().manual_seed(5)
    block_size, lengths = 16, [5, 17, 40]
    block_table = torch.tensor([[6, 0, 0], [1, 7, 0], [2, 3, 5]], dtype=torch.int32)
    general, fast = (torch.zeros(8, 2, block_size, engine.slot_bytes, dtype=torch.uint8) for _ in range(2))
    for b, length in enumerate(lengths):  # the cached positions, written alike into both pages
        positions = torch.arange(length - 1)
        slots = block_table[b, positions // block_size].long() * block_size + positions % block_size
        key, value = (torch.randn(length - 1, 2, 32, generator=gen).to(torch.bfloat16) for _ in range(2))
        for pages in (general, fast):
            assert engine.write_tokens(1, pages, slots, positions, key, value)
        engine.sinks.record(1, slots // block_size, slots % block_size, positions, key.float(), value.float())
    step = engine.decode_step_ops(1, fast)
    assert step is not None and engine.decode_step_ops(1, fast) is step
    positions = torch.tensor(lengths) - 1
    slot_mapping = block_table[torch.arange(3), positions // block_size].long() * block_size + positions % block_size
    key, value = (torch.randn(3, 2, 32, generator=gen).to(torch.bfloat16) for _ in range(2))
    query = torch.randn(3, 6, 32, generator=gen).to(torch.bfloat16)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    first_blocks = block_table[:, 0].tolist()

    assert engine.write_tokens(1, general, slot_mapping, positions, key, value)
    params = engine.kernel_params(1, torch.device("cpu"))
    expected = engine.decode_attention(1, params, query.float(), key, value, general, block_table, lengths, 0.3,
                                       lengths=seq_lens, first_blocks=first_blocks)
    assert int(step.write_tokens(key, value, slot_mapping, positions)) == 0
    assert torch.equal(fast, general)
    sinks = engine.codec.sink_tokens
    out, lse = step.decode(query, key, value, block_table, seq_lens, 0.3, skip_first=sinks,
                           sinks=engine.sink_rows(1, fast, first_blocks))
    assert out.dtype == torch.bfloat16 and lse.shape == (3, 6)
    assert torch.equal(out, expected.to(torch.bfloat16))

    with pytest.raises(KernelArgumentError, match="block_table"):  # a refused call names its argument
        step.decode(query, key, value, block_table[:2], seq_lens, 0.3, skip_first=sinks)
    monkeypatch.setenv("SEQKV_KERNELS", "torch")
    assert engine.decode_step_ops(1, fast) is None
