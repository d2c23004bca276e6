"""The seqkv attention backend: vLLM pages hold compressed K/V slots, attention reads them back.

Page layout (per layer, viewed as bytes): ``[num_blocks, num_kv_heads, block_size, slot_bytes]``
where a slot is one token-head coded by the preset (:class:`vllm_seqkv.codec.base.SlotLayout`).
The spec's ``state_content_bytes`` is ``slot_bytes``, so vLLM's own block count grows by
``2 * head_dim * 2 / slot_bytes`` (bf16 K+V per token-head over the slot).

NOTE: what attention reads, for prefill, chunked prefill and decode alike: every cached
position through encode→decode, except the query's own position (its K/V are in hand) and
the preset's sink tokens (kept exact in :class:`~.engine_codec.SinkTable`). This is the rule
the ruler (``benchmarks``) measures. Keys of pre-RoPE presets are un-rotated by their
position before encoding and rotated back after decoding, with the cos/sin table of the
layer's own vLLM rotary embedding (any position-only RoPE variant; see
:func:`~.compat.layer_rotary`); partial and interleaved rotations are served by reordering
each layer's query and key channels on entry into the rotate-half layout every codec and
kernel pairs (:meth:`SeqKVAttentionImpl.in_code_order`; q.k is unchanged). Sliding-window
layers read each sequence from the first position its queries attend to (vLLM frees the
blocks before it; each KV-cache group has its own block table in its metadata), never
through the fused decode kernel, which reads from position 0. Cross-layer presets code layer
``l`` against the reconstruction of layer ``l - 1`` for the same slots, which
:class:`~.engine_codec.LayerChain` hands up from the layer that just ran.

Reads are planned per batch (:mod:`.reads`): the sequences a layer reads are decoded in chunks,
one call per chunk and layer, each slot once however many sequences share its block; the
decode-only sequences of a chunk then attend in batched matmuls (:func:`attend_decodes`).

``forward`` writes the step's new tokens, then attends (vLLM's separate KV-update hook is not
used: one entry per layer and step). A step whose sequences all decode one token and share no
prefix runs both C++ ops through the layer's
:class:`~vllm_seqkv.kernels.cpu_ops.DecodeStepOps` (:meth:`SeqKVAttentionImpl._decode_step`);
other steps as follows. Writing new tokens is one C++ op per layer on CPU for the layers it covers
(:meth:`~.engine_codec.EngineCodec.write_tokens`: NaN check, RoPE undone, coded), and one-token
sequences attend in one fused decode call per layer with the exact sink rows merged inside it
(:meth:`~.engine_codec.EngineCodec.decode_attention`; what every layer of a step shares is
planned once per batch: :class:`~.decode_plan.FusedDecodes`). On CPU, decoding sequences that
hold the same leading blocks (prefix caching) read them once per layer for all of them
(:mod:`.decode_plan`, cascade attention); the Triton decode reads each sequence whole.
Otherwise writing and reading go through the kernels' dispatcher
(:meth:`~.engine_codec.EngineCodec.write` -> :func:`vllm_seqkv.kernels.write_slots`,
:meth:`~.engine_codec.EngineCodec.reconstruct` -> :func:`vllm_seqkv.kernels.reconstruct_blocks`):
the C++ CPU ops (``csrc/cpu/``) on CPU tensors when ``vllm_seqkv._cpu`` is built (else the
codec's torch reference, warned once), the Triton kernels on CUDA tensors or with
``SEQKV_KERNELS=triton`` (on CPU only under ``TRITON_INTERPRET=1``, as a test does). The C++ ops
cover the transform format without cross-layer prediction (``seqkv-3-nox``: write, fused decode,
prefill reconstruction); cross-layer layers keep the torch path on CPU; layer 0's token table
is coded and read by the codec (a row index and a gather).

The backend is device-agnostic: its metadata builder keeps host copies of what the
per-sequence loop walks (one device-to-host copy per batch). It takes vLLM's CPU_ATTN slot
on CPU and the CUSTOM slot on GPU, which the plugin selects. NOTE: on GPU it runs eagerly
(attention stays outside CUDA graphs: the builder reports ``AttentionCGSupport.NEVER``) and has never
been run (no GPU with vLLM was available); vLLM's selector checks on it are tested on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import torch

from vllm_seqkv.integration.compat import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    KVCacheLayout,
    MultipleOf,
    backend_slot,
    extract_layer_index,
    get_current_vllm_config,
    init_logger,
    layer_rotary,
)
from vllm_seqkv.integration.decode_plan import DecodePart, FusedDecodes, merge_partial_attention
from vllm_seqkv.integration.engine_codec import EngineCodec, active_engine_codec, start_engine_codec
from vllm_seqkv.integration.metrics import slot_bits_per_element, slot_ratio_vs_bf16
from vllm_seqkv.integration.reads import ReadChunk, plan_reads
from vllm_seqkv.integration.support import UnsupportedModelError, rotary_refusals

logger = init_logger("vllm.seqkv")
ACTIVE_MARKER = "seqkv: attention backend active"


class SeqKVAttentionBackend(AttentionBackend):
    """Takes vLLM's CPU_ATTN slot on CPU and the CUSTOM slot on GPU (see
    :func:`~.compat.backend_slot`): the same metadata, write path and read path on either
    device; the kernels' dispatcher picks torch, Triton or CUDA code by the pages' device."""

    # NOTE: forward writes the step's new tokens, then attends: one entry per layer and step
    # (vLLM's separate unified_kv_cache_update was a second Python path per layer, ~1 ms per
    # output token of SmolLM2 at one sequence, BENCHMARKS.md "One entry per layer")
    forward_includes_kv_cache_update = True
    supported_dtypes = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes = ["auto"]

    @staticmethod
    def get_name() -> str:
        return backend_slot().name  # NOTE: vLLM looks the name up in AttentionBackendEnum

    @staticmethod
    def get_impl_cls():
        return SeqKVAttentionImpl

    @staticmethod
    def get_builder_cls():
        return SeqKVMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list:
        # NOTE: vLLM's default of 16 becomes 32 (what every figure in BENCHMARKS.md ran with)
        return [MultipleOf(32)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [32, 64, 128, 256]  # powers of two: the codecs' rotations and the kernels' tiles

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple:
        return (KVCacheLayout.LBHNC,)  # pages [num_blocks, H, block_size, slot_bytes]

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True  # read from the window's first position; vLLM frees the blocks before it

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def customize_spec(cls, spec):
        engine = active_engine_codec()
        return replace(spec, state_content_bytes=engine.slot_bytes)


@dataclass
class SeqKVMetadata:
    """One batch's attention metadata, shared by every layer.

    On the cache's device: query_start_loc ``[B + 1]``, seq_lens ``[B]``, block_table
    ``[B, max_blocks]``, slot_mapping ``[T]`` and positions ``[T]`` (each scheduled token's
    position in its sequence; 0 for padding tokens, whose slot is -1). On the host, copied
    once per batch so that no layer waits on the device to walk the batch: query_starts,
    seq_lens_host and block_table_host. ``read_plans``: the batch's read plans, by the
    sequences read (filled by the first layer that reads them).
    """

    num_actual_tokens: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    positions: torch.Tensor
    query_starts: list[int]
    seq_lens_host: list[int]
    block_table_host: torch.Tensor
    read_plans: dict[tuple[int, ...], list[ReadChunk]] = field(default_factory=dict)
    per_batch: dict[tuple, object] = field(default_factory=dict)

    def fused_decodes(self, min_saved_positions: int | None = 0) -> "FusedDecodes | None":
        """The batch's one-token sequences and what the fused decode takes for them (shared
        prefixes planned unless ``min_saved_positions`` is None: see
        :func:`~.decode_plan.shared_prefixes`), built once per batch (every layer of a KV-cache
        group reads the same), or None when there are none."""
        key = ("decodes", min_saved_positions)
        if key not in self.per_batch:
            starts = self.query_starts
            decodes = [i for i in range(len(starts) - 1) if starts[i + 1] - starts[i] == 1]
            block_size = self.per_batch.get("block_size")
            self.per_batch[key] = FusedDecodes.of(
                starts, self.seq_lens_host, self.block_table, self.block_table_host, decodes,
                block_size, min_saved_positions) if decodes else None
        return self.per_batch[key]

    def sink_writes(self, slot_mapping: torch.Tensor, block_size: int, sink_tokens: int) -> torch.Tensor | None:
        """Indices ``[n]`` of the tokens written at a block offset below ``sink_tokens`` (what the
        sink table records), or None when there are none; once per batch."""
        key = ("sink_writes", slot_mapping.data_ptr(), slot_mapping.shape[0], block_size, sink_tokens)
        if key not in self.per_batch:
            rows = ((slot_mapping >= 0) & (slot_mapping % block_size < sink_tokens)).nonzero().flatten()
            self.per_batch[key] = rows if rows.numel() else None
        return self.per_batch[key]

    def plan_reads(self, seqs: list[int], block_size: int, device,
                   window: int | None = None) -> list[ReadChunk]:
        """:func:`~.reads.plan_reads` of ``seqs``, planned once per batch and reused by every
        layer that reads the same sequences. ``window``: a sliding-window layer's window; each
        sequence is read from the first position its first query attends to."""
        plan = self.read_plans.get((tuple(seqs), window))
        if plan is None:
            firsts = None
            if window is not None:
                queries = [self.query_starts[i + 1] - self.query_starts[i]
                           for i in range(len(self.seq_lens_host))]
                firsts = [max(0, n - q - (window - 1)) for n, q in zip(self.seq_lens_host, queries)]
            plan = plan_reads(seqs, self.seq_lens_host, self.block_table_host, block_size, device,
                              first_positions=firsts)
            self.read_plans[(tuple(seqs), window)] = plan
        return plan


class SeqKVMetadataBuilder(AttentionMetadataBuilder[SeqKVMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> SeqKVMetadata:
        m = common_attn_metadata
        num_reqs = m.num_reqs
        query_starts = m.query_start_loc_cpu[:num_reqs + 1].tolist()
        seq_lens = m.seq_lens[:num_reqs]
        seq_lens_host = seq_lens.cpu().tolist()
        block_table = m.block_table_tensor[:num_reqs]
        positions = token_positions(query_starts, seq_lens_host, m.slot_mapping.shape[0])
        return SeqKVMetadata(
            num_actual_tokens=m.num_actual_tokens,
            query_start_loc=m.query_start_loc[:num_reqs + 1],
            seq_lens=seq_lens,
            block_table=block_table,
            slot_mapping=m.slot_mapping,
            positions=positions.to(m.slot_mapping.device),
            query_starts=query_starts,
            seq_lens_host=seq_lens_host,
            block_table_host=block_table.cpu(),
        )


class SeqKVAttentionImpl(AttentionImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes, sliding_window, kv_cache_dtype: str, logits_soft_cap=None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name=None,
                 sinks=None) -> None:
        unsupported = {
            "ALiBi": alibi_slopes is not None,
            "logit soft-capping": bool(logits_soft_cap),
            "attention sinks": sinks is not None,
            "KV sharing across layers": kv_sharing_target_layer_name is not None,
            f"attention type {attn_type!r}": attn_type != AttentionType.DECODER,
            f"kv_cache_dtype {kv_cache_dtype!r} (seqkv needs 'auto')": kv_cache_dtype != "auto",
        }
        refused = [feature for feature, present in unsupported.items() if present]
        if refused:
            raise NotImplementedError(
                "--kv-cache-backend seqkv does not support this model: it uses "
                + ", ".join(refused) + ". Serve it with --kv-cache-backend auto."
            )
        self.num_heads, self.head_size, self.num_kv_heads = num_heads, head_size, num_kv_heads
        self.scale = float(scale)
        self.sliding_window = sliding_window if sliding_window and sliding_window > 0 else None
        self.engine: EngineCodec = start_engine_codec(num_kv_heads, head_size)
        # NOTE: positions stay below max_model_len: the RoPE tables keep that many rows (the
        # fixed memory counted in the KV budget, vllm_seqkv.integration.fixed_memory)
        self.max_positions = get_current_vllm_config().model_config.max_model_len
        if self.sliding_window is not None and (self.engine.codec.cross_layer or self.engine.sinks.by_token):
            # NOTE: both read another layer's pages under this layer's block ids; with sliding
            # windows, layers sit in different KV-cache groups with their own block tables
            raise NotImplementedError(
                f"--kv-cache-backend seqkv: preset {self.engine.preset} reads across layers "
                "(cross-layer prediction or a layer-0 token table), which sliding-window layers "
                "(their own KV-cache group) do not allow; use a per-layer preset such as the "
                "default seqkv-f4, or --kv-cache-backend auto.")
        self.kv_sharing_target_layer_name = None
        self._layer_index: int | None = None  # of the one layer this impl serves (vLLM: one impl per layer)
        self._rope_ready = False
        self._channel_order: torch.Tensor | None = None  # see _ensure_rope
        pid = os.getpid()
        if self.engine.announce(pid):
            logger.info(
                "%s in pid %d (preset %s): compressed pages of %d bytes per token-head slot "
                "(%.2f bits/element all-in, %.2fx fewer bytes than %s)",
                ACTIVE_MARKER, pid, self.engine.preset, self.engine.slot_bytes,
                slot_bits_per_element(self.engine.slot_bytes, self.engine.head_dim),
                slot_ratio_vs_bf16(self.engine.slot_bytes, self.engine.head_dim), "bf16",
            )

    def _decode_step(self, step, layer_index: int, metadata: SeqKVMetadata, part: DecodePart,
                     query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output: torch.Tensor) -> None:
        """A step whose sequences all decode one token and share no prefix, on CPU: the new
        tokens written and every sequence's attention in one fused decode, both C++ ops called
        through the layer's :class:`~vllm_seqkv.kernels.cpu_ops.DecodeStepOps` (what
        :meth:`_write_new_tokens` and :meth:`_fused_decode` do for such a step, with fewer
        Python calls: a decode step calls this once per layer)."""
        slot_mapping, positions = _new_token_slots(metadata, key)
        num = slot_mapping.shape[0]
        nonfinite = step.write_tokens(key[:num], value[:num], slot_mapping, positions)
        if nonfinite.item():
            self.engine.warn_nonfinite(layer_index, nonfinite.item(), num)
        sinks = self.engine.codec.sink_tokens
        if sinks:
            self._record_sink_writes(layer_index, metadata, slot_mapping, positions, key, value, step.pages)
        sink_rows = self.engine.sink_rows(layer_index, step.pages, part.first_blocks) if sinks else None
        rows = part.rows
        # NOTE: the model's dtype in and out (the op converts its inputs and computes in float32)
        out, _ = step.decode(query[rows], key[rows], value[rows], part.block_table, part.lengths, self.scale,
                             skip_first=sinks, sinks=sink_rows)
        _store_rows(output, rows, out)

    def _write_new_tokens(self, layer_index: int, metadata: SeqKVMetadata, key: torch.Tensor,
                          value: torch.Tensor, pages: torch.Tensor) -> None:
        """Code the step's new tokens' K (in code order) / V ``[T, H, D]`` into their slots
        (``metadata.slot_mapping``; -1 = padding)."""
        slot_mapping, all_positions = _new_token_slots(metadata, key)
        num = slot_mapping.shape[0]
        if self.engine.write_tokens(layer_index, pages, slot_mapping, all_positions, key[:num], value[:num]):
            if self.engine.codec.sink_tokens:
                self._record_sink_writes(layer_index, metadata, slot_mapping, all_positions, key, value, pages)
            return
        valid = slot_mapping >= 0
        if not bool(valid.any()):
            return
        slots = slot_mapping[valid].long()
        positions = all_positions[valid]
        key, value = finite_or_zero(key[:num][valid].float(), value[:num][valid].float(),
                                    layer_index)
        self.engine.write(layer_index, pages, slots, self.engine.to_code_frame(key, positions, layer_index),
                          value)
        blocks, offsets = slots // pages.shape[2], slots % pages.shape[2]
        self.engine.sinks.record(layer_index, blocks, offsets, positions, key, value)

    def _record_sink_writes(self, layer_index: int, metadata: SeqKVMetadata, slot_mapping: torch.Tensor,
                            positions: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            pages: torch.Tensor) -> None:
        """The written tokens at a block offset below the sink tokens, exact (NaN/inf as 0), into
        the sink table."""
        rows = metadata.sink_writes(slot_mapping, pages.shape[2], self.engine.codec.sink_tokens)
        if rows is not None:
            slots = slot_mapping[rows].long()
            clean = [torch.nan_to_num(t[rows].float(), nan=0.0, posinf=0.0, neginf=0.0) for t in (key, value)]
            self.engine.sinks.record(layer_index, slots // pages.shape[2], slots % pages.shape[2],
                                     positions[rows], clean[0], clean[1])

    def index_of(self, layer) -> int:
        """The layer's index in the model (parsed from its name once: every step asks)."""
        if self._layer_index is None:
            self._layer_index = extract_layer_index(layer.layer_name)
        return self._layer_index

    def _ensure_rope(self, layer, layer_index: int) -> None:
        """Once per layer, for pre-RoPE presets: give the engine codec the RoPE table of the
        model's own rotary embedding for this layer, over the channel order that makes it
        full-width neox (partial and interleaved rotations; :func:`~vllm_seqkv.codec.rope.
        channel_order`, applied to this layer's queries and keys by :meth:`in_code_order`);
        refuses a rotation the codec cannot invert."""
        if not self.engine.codec.pre_rope_keys or self._rope_ready:
            return
        rotary = layer_rotary(layer.layer_name)
        refusals = rotary_refusals(rotary, self.head_size)
        if refusals:
            raise UnsupportedModelError(
                f"--kv-cache-backend seqkv does not support this model: layer {layer.layer_name} "
                f"uses {'; '.join(refusals)}. Serve it with --kv-cache-backend auto.")
        self._channel_order = rotary.channel_order()
        if not self.engine.has_rope_table(layer_index):
            rows = replace(rotary, table=rotary.table[:self.max_positions])  # widen only the rows kept
            self.engine.set_rope_table(layer_index, rows.full_width_table())
        self._rope_ready = True

    def in_code_order(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """Queries or keys ``[T, H, D]`` as the model hands them -> the channel order the codec
        and kernels pair (the same tensor when the model's rotation is full-width neox).
        Reordering queries and keys alike keeps every q.k; values are never reordered."""
        if x is None or self._channel_order is None:
            return x
        if self._channel_order.device != x.device:
            self._channel_order = self._channel_order.to(x.device)
        return x.index_select(-1, self._channel_order)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: SeqKVMetadata, output: torch.Tensor,
                output_scale=None, output_block_scale=None) -> torch.Tensor:
        """query ``[T, Hq, D]``, key/value ``[T, H, D]`` (the step's new tokens, written first),
        output ``[T, Hq, D]``."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("seqkv: fused output quantization is not supported")
        if attn_metadata is None:
            return output
        pages = _byte_pages(kv_cache)
        layer_index = self.index_of(layer)
        self._ensure_rope(layer, layer_index)
        query, key = self.in_code_order(query), self.in_code_order(key)
        self.engine.chain.register(layer_index, pages)
        starts = attn_metadata.query_starts
        block_size = pages.shape[2]
        attn_metadata.per_batch.setdefault("block_size", block_size)
        step = self.engine.decode_step_ops(layer_index, pages) if self.sliding_window is None else None
        if step is not None:
            decodes = attn_metadata.fused_decodes(self.engine.config.shared_prefix_min_saved_positions)
            if decodes is not None and not decodes.shared and len(decodes.seqs) == len(starts) - 1:
                self._decode_step(step, layer_index, attn_metadata, decodes.alone, query, key, value, output)
                return output
        self._write_new_tokens(layer_index, attn_metadata, key, value, pages)
        fused = (self.engine.fused_decode_params(layer_index, pages.device)
                 if self.sliding_window is None else None)  # the fused kernel reads from position 0
        sharing = (self.engine.config.shared_prefix_min_saved_positions
                   if fused is not None and self.engine.reads_shared_prefixes(fused, pages.device) else None)
        decodes = attn_metadata.fused_decodes(sharing) if fused is not None else None
        if decodes is not None:
            self._fused_decode(layer_index, fused, decodes, query, key, value, pages, output)
            if len(decodes.seqs) == len(starts) - 1:
                return output
        reads = [i for i in range(len(starts) - 1)
                 if starts[i + 1] > starts[i] and not (decodes is not None and starts[i + 1] - starts[i] == 1)]
        for chunk in attn_metadata.plan_reads(reads, block_size, pages.device, self.sliding_window):
            self._attend_chunk(layer_index, chunk, query, key, value, pages, starts, output)
        return output

    def _attend_chunk(self, layer_index: int, chunk: ReadChunk, query: torch.Tensor,
                      key: torch.Tensor, value: torch.Tensor, pages: torch.Tensor,
                      query_starts: list[int], output: torch.Tensor) -> None:
        """Attention of the chunk's sequences over their cached positions, decoded in one call."""
        if self.engine.codec.cross_layer:
            previous = self.engine.chain.below(layer_index, chunk.key, chunk.slots)
            cached_k, cached_v = self.engine.reconstruct(layer_index, pages, chunk.blocks, chunk.rows,
                                                         previous)
            self.engine.chain.keep(layer_index, chunk.key, (cached_k, cached_v))
            cached_k = self.engine.from_code_frame(cached_k, chunk.positions, layer_index)
        else:
            cached_k, cached_v = self.engine.reconstruct_model_frame(
                layer_index, pages, chunk.blocks, chunk.rows, chunk.positions, chunk.block_positions)
        # NOTE: copies, one row per sequence position: the exact sink rows restored below
        # never reach the layer above's prediction
        cached_k = cached_k[chunk.gather]
        cached_v = cached_v[chunk.gather]
        decodes = []
        for j, i in enumerate(chunk.seqs):
            r0, r1 = chunk.starts[j], chunk.starts[j + 1]
            q0, q1 = query_starts[i], query_starts[i + 1]
            if chunk.first_positions[j] == 0:  # a window past the start reads no sink rows
                self.engine.sinks.restore(layer_index, chunk.first_blocks[j], cached_k[r0:r1],
                                          cached_v[r0:r1])
            if q1 - q0 == 1:  # its rows are exactly its window
                decodes.append(j)
                continue
            out = attend(query[q0:q1].float(), cached_k[r0:r1], cached_v[r0:r1], key[q0:q1].float(),
                         value[q0:q1].float(), self.scale, self.sliding_window)
            output[q0:q1].copy_(out.view(output[q0:q1].shape))
        if decodes:
            tokens = torch.tensor([query_starts[chunk.seqs[j]] for j in decodes], device=query.device)
            out = attend_decodes(query[tokens].float(), cached_k, cached_v, key[tokens].float(),
                                 value[tokens].float(), [chunk.starts[j] for j in decodes],
                                 [chunk.starts[j + 1] for j in decodes], self.scale)
            output[tokens] = out.to(output.dtype).view(len(decodes), *output.shape[1:])

    def _fused_decode(self, layer_index: int, params, decodes: FusedDecodes, query: torch.Tensor,
                      key: torch.Tensor, value: torch.Tensor, pages: torch.Tensor,
                      output: torch.Tensor) -> None:
        """The batch's one-token sequences by the fused decode kernel: one call for those alone,
        a prefix pass and a call for the rest per shared prefix (:mod:`.decode_plan`)."""
        if decodes.alone is not None:
            part = decodes.alone
            out = self._decode_part(layer_index, params, part, query, key, value, pages)
            _store_rows(output, part.rows, out)
        for prefix in decodes.shared:
            part = prefix.part
            _announce_shared_prefix(prefix.length, len(part))
            queries = query[part.rows].float()
            head, head_lse = self.engine.decode_shared_prefix(
                layer_index, params, queries, pages, prefix.block_table, prefix.length, prefix.first_block,
                self.scale)
            rest, rest_lse = self._decode_part(layer_index, params, part, query, key, value, pages,
                                               from_position=prefix.length, queries=queries)
            _store_rows(output, part.rows, merge_partial_attention(head, head_lse, rest, rest_lse))

    def _decode_part(self, layer_index: int, params, part: DecodePart, query: torch.Tensor,
                     key: torch.Tensor, value: torch.Tensor, pages: torch.Tensor,
                     from_position: int | None = None, queries: torch.Tensor | None = None):
        """``part``'s sequences over their pages (from ``from_position`` on, with the
        log-sum-exp, when given) -> ``[n, Hq, D]`` float32 (and ``lse [n, Hq]``)."""
        rows = part.rows
        # NOTE: a float32 query makes the op's output float32 (own K/V are converted inside the op)
        return self.engine.decode_attention(
            layer_index, params, query[rows].float() if queries is None else queries, key[rows], value[rows], pages,
            part.block_table, part.seq_lens, self.scale, lengths=part.lengths, first_blocks=part.first_blocks,
            from_position=from_position)


_ANNOUNCED = []


def _announce_shared_prefix(length: int, sharers: int) -> None:
    if not _ANNOUNCED:
        _ANNOUNCED.append(True)
        logger.info("seqkv: decode reads a prefix of %d positions shared by %d sequences once per layer "
                    "(logged once)", length, sharers)


def _store_rows(output: torch.Tensor, rows: torch.Tensor | slice, out: torch.Tensor) -> None:
    """``out [n, Hq, D]`` into the output rows ``rows`` of ``output [T, Hq, D]``."""
    out = out.view(out.shape[0], *output.shape[1:])
    if isinstance(rows, slice):
        output[rows].copy_(out)
    else:
        output[rows] = out.to(output.dtype)


def finite_or_zero(key: torch.Tensor, value: torch.Tensor, layer_index: int):
    """K/V ``[T, H, D]`` with NaN/inf replaced by 0, and a warning naming how many tokens had them.

    NOTE: the codecs refuse non-finite input (a shared scale would spread it over a whole
    token-head); the model produced it, so the engine stays up, as with vLLM's own backends,
    instead of failing every running request.
    """
    finite = torch.isfinite(key).all() & torch.isfinite(value).all()
    if bool(finite):
        return key, value
    bad = ~(torch.isfinite(key).flatten(1).all(1) & torch.isfinite(value).flatten(1).all(1))
    logger.warning("seqkv: layer %d: K/V of %d of %d new tokens contain NaN or inf (the model's "
                   "output); stored with those values as 0", layer_index, int(bad.sum()),
                   key.shape[0])
    return (torch.nan_to_num(key, nan=0.0, posinf=0.0, neginf=0.0),
            torch.nan_to_num(value, nan=0.0, posinf=0.0, neginf=0.0))


def token_positions(query_starts: list[int], seq_lens: list[int], num_tokens: int) -> torch.Tensor:
    """Position in its sequence of every scheduled token ``[num_tokens]`` (query order; 0 for
    the padding tokens after the last request's)."""
    starts = torch.tensor(query_starts)
    query_lens = starts[1:] - starts[:-1]
    first = torch.tensor(seq_lens, dtype=torch.long) - query_lens
    request = torch.repeat_interleave(torch.arange(query_lens.numel()), query_lens)
    scheduled = min(int(starts[-1]), num_tokens)
    positions = torch.zeros(num_tokens, dtype=torch.long)
    positions[:scheduled] = (first[request] + torch.arange(int(starts[-1]))
                             - starts[:-1][request])[:scheduled]
    return positions


def attend(query: torch.Tensor, cached_k: torch.Tensor, cached_v: torch.Tensor,
           own_k: torch.Tensor, own_v: torch.Tensor, scale: float,
           window: int | None = None) -> torch.Tensor:
    """Causal attention of the last ``Q`` positions of a sequence over its decoded cache.

    query ``[Q, Hq, D]``; cached_k/v ``[S, H, D]`` (decoded, S >= Q, consecutive positions
    ending at the last query's); own_k/v ``[Q, H, D]`` (exact K/V of the query positions, used
    on the diagonal). ``window``: a query attends to the ``window`` positions ending at its own
    (sliding-window layers). Returns ``[Q, Hq, D]``.
    """
    if _FLASH_WITH_LSE is not None and query.device.type == "cpu":
        return _attend_flash(query, cached_k, cached_v, own_k, own_v, scale, window)
    return _attend_dense(query, cached_k, cached_v, own_k, own_v, scale, window)


# torch's CPU flash attention, which also returns the log-sum-exp (None where this torch lacks it)
_FLASH_WITH_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _attend_flash(query, cached_k, cached_v, own_k, own_v, scale, window) -> torch.Tensor:
    """:func:`attend` by torch's CPU flash attention: the decoded cache strictly before each
    query (mask), then the exact own position merged by the log-sum-exp."""
    q_len, num_heads, dim = query.shape
    seq_len, num_kv_heads, _ = cached_k.shape
    group = num_heads // num_kv_heads
    k = cached_k.transpose(0, 1).repeat_interleave(group, dim=0)[None]  # [1, Hq, S, D]
    v = cached_v.transpose(0, 1).repeat_interleave(group, dim=0)[None]
    positions = torch.arange(seq_len - q_len, seq_len, device=query.device)
    columns = torch.arange(seq_len, device=query.device)
    earlier = columns[None, :] < positions[:, None]  # [Q, S]
    if window is not None:
        earlier &= columns[None, :] > positions[:, None] - window
    mask = torch.zeros(q_len, seq_len, device=query.device).masked_fill_(~earlier, float("-inf"))
    out, lse = _FLASH_WITH_LSE(query.transpose(0, 1)[None].contiguous(), k, v, 0.0, False, attn_mask=mask,
                               scale=scale)
    out, lse = out[0].transpose(0, 1), lse[0].transpose(0, 1)  # [Q, Hq, D], [Q, Hq]
    lse = lse.masked_fill(~earlier.any(1)[:, None], float("-inf"))  # nothing earlier: no cached mass
    own = (query * own_k.repeat_interleave(group, dim=1)).sum(-1) * scale  # [Q, Hq]
    weights = torch.stack([lse, own]).softmax(0)
    return weights[0, ..., None] * out.nan_to_num(0.0) + weights[1, ..., None] * own_v.repeat_interleave(group, dim=1)


def _attend_dense(query, cached_k, cached_v, own_k, own_v, scale, window) -> torch.Tensor:
    """:func:`attend` with the whole score matrix (the reference of :func:`_attend_flash`)."""
    q_len, num_heads, _ = query.shape
    seq_len, num_kv_heads, _ = cached_k.shape
    group = num_heads // num_kv_heads
    k = cached_k.repeat_interleave(group, dim=1)  # [S, Hq, D]
    v = cached_v.repeat_interleave(group, dim=1)
    own_k = own_k.repeat_interleave(group, dim=1)  # [Q, Hq, D]
    own_v = own_v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,shd->hqs", query, k) * scale  # [Hq, Q, S]
    positions = torch.arange(seq_len - q_len, seq_len, device=query.device)
    rows = torch.arange(q_len, device=query.device)
    scores[:, rows, positions] = torch.einsum("qhd,qhd->hq", query, own_k) * scale
    future = torch.arange(seq_len, device=query.device)[None, :] > positions[:, None]  # [Q, S]
    if window is not None:
        future |= torch.arange(seq_len, device=query.device)[None, :] <= positions[:, None] - window
    probs = scores.masked_fill(future, float("-inf")).softmax(-1)
    out = torch.einsum("hqs,shd->qhd", probs, v)
    own_weight = probs[:, rows, positions].transpose(0, 1).unsqueeze(-1)  # [Q, Hq, 1]
    return out + own_weight * (own_v - v[positions])


def attend_decodes(query: torch.Tensor, cached_k: torch.Tensor, cached_v: torch.Tensor,
                   own_k: torch.Tensor, own_v: torch.Tensor, starts: list[int], ends: list[int],
                   scale: float) -> torch.Tensor:
    """:func:`attend` for ``B`` sequences of one query token each, in batched matmuls.

    query ``[B, Hq, D]``, own_k/v ``[B, H, D]``; sequence ``b`` reads rows ``starts[b] ..
    ends[b] - 1`` of cached_k/v ``[R, H, D]`` (its last row is its query position, read from
    own_k/v instead). Returns ``[B, Hq, D]``. Sequences of similar lengths are padded to a
    common length together (groups padded to at most twice their rows).
    """
    out = query.new_empty(query.shape)
    for group in _similar_lengths([e - s for s, e in zip(starts, ends)]):
        index = torch.tensor(group, device=query.device)
        out[index] = _attend_padded(query[index], cached_k, cached_v, own_k[index], own_v[index],
                                    [starts[b] for b in group], [ends[b] for b in group], scale)
    return out


def _similar_lengths(lengths: list[int]) -> list[list[int]]:
    """Indices of ``lengths`` grouped, by ascending length, so that each group padded to its
    longest holds at most twice its rows."""
    groups, total = [], 0
    for b in sorted(range(len(lengths)), key=lengths.__getitem__):
        if not groups or (len(groups[-1]) + 1) * lengths[b] > 2 * (total + lengths[b]):
            groups.append([])
            total = 0
        groups[-1].append(b)
        total += lengths[b]
    return groups


def _attend_padded(query, cached_k, cached_v, own_k, own_v, starts, ends, scale) -> torch.Tensor:
    batch, num_heads, dim = query.shape
    num_kv_heads = cached_k.shape[1]
    device = query.device
    lengths = torch.tensor(ends, device=device) - torch.tensor(starts, device=device)
    offsets = torch.arange(max(e - s for s, e in zip(starts, ends)), device=device)
    valid = offsets[None, :] < lengths[:, None]  # [B, L]
    index = torch.where(valid, torch.tensor(starts, device=device)[:, None] + offsets, 0)
    k, v = cached_k.transpose(0, 1)[:, index], cached_v.transpose(0, 1)[:, index]  # [H, B, L, D] copies
    batch_rows = torch.arange(batch, device=device)
    k[:, batch_rows, lengths - 1] = own_k.transpose(0, 1)
    v[:, batch_rows, lengths - 1] = own_v.transpose(0, 1)
    q = query.view(batch, num_kv_heads, num_heads // num_kv_heads, dim).transpose(0, 1)  # [H, B, G, D]
    scores = (q @ k.transpose(-1, -2)) * scale  # [H, B, G, L]
    scores.masked_fill_(~valid[None, :, None, :], float("-inf"))
    out = scores.softmax(-1) @ v  # [H, B, G, D]
    return out.transpose(0, 1).reshape(batch, num_heads, dim)


def _new_token_slots(metadata: SeqKVMetadata, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The slot ``[n]`` (-1: padding) and position ``[n]`` of each of the step's new tokens that
    has a slot (``n = min(len(slot_mapping), len(key))``): what a write codes."""
    slot_mapping = metadata.slot_mapping[:key.shape[0]]
    return slot_mapping, _padded(metadata.positions, slot_mapping.shape[0])


def _padded(positions: torch.Tensor, num: int) -> torch.Tensor:
    """``positions`` cut or zero-padded to ``num`` tokens. NOTE: vLLM may pad the slot mapping
    it hands the KV update beyond the batch's tokens (to a CUDA-graph size); padding slots are
    -1, so their positions are never read."""
    if positions.shape[0] >= num:
        return positions[:num]
    return torch.nn.functional.pad(positions, (0, num - positions.shape[0]))


def _byte_pages(kv_cache: torch.Tensor) -> torch.Tensor:
    """vLLM's layer view ``[num_blocks, H, block_size, C]`` (any dtype) as uint8 slots."""
    return kv_cache.view(torch.uint8) if kv_cache.dtype != torch.uint8 else kv_cache

