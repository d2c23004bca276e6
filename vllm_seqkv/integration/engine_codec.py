"""The codec of the engine running in this process: preset + the model's calibration.

NOTE: imports vLLM only to find the engine being built (:func:`start_engine_codec`), so the
data path the backend calls (:class:`EngineCodec`) also runs where vLLM is not installed
(the GPU check machine; tests/kernels/test_engine_codec_on_device.py)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from vllm_seqkv.calibrate import load, load_for_model
from vllm_seqkv.codec import make_codec, needs_calibration
from vllm_seqkv.codec.base import KVCodec, SlotLayout
from vllm_seqkv.codec.rope import default_table, rope_theta, rotate_by_table, split_table, unrotate_by_table
from vllm_seqkv.codec.token_table import TokenTableCodec
from vllm_seqkv.config import SeqKVConfig, from_additional_config
from vllm_seqkv.integration.reads import gather_slots

logger = logging.getLogger("vllm.seqkv")
CHECK_KERNELS = os.environ.get("SEQKV_KERNELS_CHECK", "0") == "1"
KERNEL_CHECK_TOLERANCE = 1e-3
WRITE_CHECK_TOLERANCE = 1e-2


def build_codec(config: SeqKVConfig, model_config) -> EngineCodec:
    """The codec ``config.preset`` gives for a vLLM ``ModelConfig``."""
    return EngineCodec(config, model_config.model, model_config.get_total_num_kv_heads(),
                       model_config.get_head_size(), rope_theta(model_config.hf_config),
                       kv_dtype=model_config.dtype)


class SinkTable:
    """Exact K/V of the first ``sink_tokens`` positions of each sequence.

    Two ways to key them:

    * by first token (``first_token`` given, ``sink_tokens == 1``): position 0 attends only
      to itself, so its K/V at every layer are a function of its token id alone, and every
      sequence starting with that token shares one entry per layer. ``first_token(block)``
      reads the token id at offset 0 of ``block`` (layer 0's token-table slot). The table
      tracks which blocks hold a sequence start and with which token: an entry lives while
      some block starts with its token (a write over a block's offset 0 moves or ends its
      start). Size: one entry per distinct first token of the blocks that hold a start, and
      layer (``H x D`` K and V each): at most ``min(vocab, blocks)`` per layer, not growing
      with the number of sequences (chat templates start every sequence with the same token).
    * by (layer, block) otherwise. NOTE: an entry is valid only while its block holds the
      start of a sequence: a write at offset ``o < sink_tokens`` with position ``!= o`` means
      the block was reused for a later part of some sequence, and drops the entry. Size: up
      to one entry per block and layer.

    Rows are kept in ``dtype``, the dtype of the K/V the model hands the backend (vLLM's model
    dtype, bf16 or fp16 when served): converting them to it is then exact, and every reader
    gets float32 rows equal to the float32 view of what the model produced (a float32 container
    would hold the same values in twice the bytes). Rows given in another dtype (float32 copies
    from the backend, a cold tier's records) are converted on the way in.

    The table is bounded by ``max_bytes`` (``sink_table_bytes``; taken from vLLM's KV budget,
    :mod:`~.fixed_memory`): when full, a new entry is not kept (warned once) and its
    sequences attend over the sink rows as coded in the pages, like the ``-nosink``
    ablation. The bits/element figures count these tokens at 16 bits.
    """

    def __init__(self, sink_tokens: int, first_token=None, max_bytes: int | None = None,
                 dtype: torch.dtype = torch.float32):
        self.sink_tokens = sink_tokens
        self.first_token = first_token if sink_tokens == 1 else None
        self.max_bytes = max_bytes
        self.dtype = dtype
        self.nbytes = 0  # NOTE: the bytes of every row in _exact, kept current
        self.refused = 0  # entries not kept because the table was full
        self._exact: dict[tuple[int, int], dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._start_token: dict[int, int] = {}  # by token: block -> the token it starts a sequence with
        self._starts: dict[int, int] = {}  # by token: token -> how many blocks start with it
        self._layers: set[int] = set()  # layers that have had entries
        self._version = 0  # bumped by every change of _exact (all_rows' memo is valid within one)
        self._stacked: dict[int, tuple[int, tuple[int, ...], tuple[torch.Tensor, torch.Tensor]]] = {}

    @property
    def by_token(self) -> bool:
        return self.first_token is not None

    def __len__(self) -> int:
        return len(self._exact)

    def _set(self, entry_key: tuple[int, int], rows: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep ``rows`` as the entry (replacing any), if the table has room for them."""
        size = self._size(rows)
        freed = self._size(self._exact.get(entry_key, {}))
        if self.max_bytes is not None and self.nbytes - freed + size > self.max_bytes:
            self.refused += 1
            if self.refused == 1:
                logger.warning("seqkv: the sink table is full (%d bytes, sink_table_bytes %d); "
                               "new sequence starts attend over their coded sink rows (slightly "
                               "lower quality); raise sink_table_bytes to keep them exact",
                               self.nbytes, self.max_bytes)
            return
        self.nbytes += size - freed
        self._exact[entry_key] = rows
        self._layers.add(entry_key[0])
        self._version += 1

    def _drop(self, entry_key: tuple[int, int]) -> None:
        if entry_key in self._exact:
            self.nbytes -= self._size(self._exact.pop(entry_key))
            self._version += 1

    @staticmethod
    def _size(rows) -> int:
        return sum(k.nbytes + v.nbytes for k, v in rows.values())

    def _entry_key(self, layer: int, block: int) -> tuple[int, int] | None:
        if not self.by_token:
            return layer, block
        token = self.first_token(block)
        return None if token is None else (layer, token)

    def record(self, layer: int, blocks: torch.Tensor, offsets: torch.Tensor,
               positions: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """blocks/offsets/positions ``[T]``, key/value ``[T, H, D]`` (exact, post-RoPE)."""
        touched = (offsets < self.sink_tokens).nonzero().flatten().tolist()
        for i in touched:
            block, offset = int(blocks[i]), int(offsets[i])
            starts = int(positions[i]) == offset
            if self.by_token:
                token = self._track_start(block, starts)
                if token is not None and (layer, token) not in self._exact:  # one value per token
                    self._set((layer, token), {0: self._row(key[i], value[i])})
            elif not starts:
                self._drop((layer, block))
            else:
                rows = dict(self._exact.get((layer, block), {}))
                rows[offset] = self._row(key[i], value[i])
                self._set((layer, block), rows)

    def _track_start(self, block: int, starts: bool) -> int | None:
        """By token: ``block``'s offset 0 was just written, with a sequence start (``starts``)
        or not; returns the token it starts with (None: no start). The block's former token
        loses a start; a token no block starts with any more loses its entries (every layer)."""
        old = self._start_token.get(block)
        new = self.first_token(block) if starts else None
        if new == old:
            return new
        if old is not None:
            del self._start_token[block]
            self._starts[old] -= 1
            if not self._starts[old]:
                del self._starts[old]
                for layer in self._layers:
                    self._drop((layer, old))
        if new is not None:
            self._start_token[block] = new
            self._starts[new] = self._starts.get(new, 0) + 1
        return new

    def _row(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Own copies of one position's K/V ``[H, D]`` in the table's dtype."""
        return key.to(self.dtype, copy=True), value.to(self.dtype, copy=True)

    def export(self, layer: int, block: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Copy of the exact rows for sequence-start ``block``: ``{offset: (key [H, D],
        value [H, D])}`` (empty if none). For a KV connector saving the block."""
        entry_key = self._entry_key(layer, block)
        entry = self._exact.get(entry_key, {}) if entry_key is not None else {}
        return {o: (k.clone(), v.clone()) for o, (k, v) in entry.items()}

    def import_(self, layer: int, block: int, entry: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Install what :meth:`export` gave for the block's bytes (already in the pages). By
        block: replaces what the block held before (empty -> no entry). By token: the block
        starts a sequence with its token when the record has rows (else it starts none), and
        adds the token's entry if it has none."""
        rows = {int(o): self._row(k, v) for o, (k, v) in entry.items()}
        if self.by_token:
            token = self._track_start(block, bool(rows))
            if rows and token is not None and (layer, token) not in self._exact:
                self._set((layer, token), rows)
        else:
            self._drop((layer, block))
            if rows:
                self._set((layer, block), rows)

    def all_rows(self, layer: int, first_blocks: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """K (post-RoPE) and V ``[B, S, H, D]`` (the table's dtype) of the sink positions of the
        sequences starting at ``first_blocks``, when the table holds every one of them exactly (else None: the
        caller decodes the pages and :meth:`restore` overwrites what the table knows). NOTE: the
        stacked rows are kept per layer until the table or the blocks change: a decode step asks
        every layer for the same sequences."""
        blocks = tuple(first_blocks)
        memo = self._stacked.get(layer)
        if memo is not None and memo[0] == self._version and memo[1] == blocks:
            return memo[2]
        keys, values = [], []
        for block in first_blocks:
            entry_key = self._entry_key(layer, block)
            entry = self._exact.get(entry_key) if entry_key is not None else None
            if entry is None or len(entry) < self.sink_tokens:
                return None
            for offset in range(self.sink_tokens):
                k, v = entry[offset]
                keys.append(k)
                values.append(v)
        shape = (len(first_blocks), self.sink_tokens, *keys[0].shape)
        rows = torch.stack(keys).view(shape), torch.stack(values).view(shape)
        self._stacked[layer] = (self._version, blocks, rows)
        return rows

    def restore(self, layer: int, first_block: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Overwrite the decoded sink rows of ``key``/``value [S, H, D]`` with the exact ones."""
        entry_key = self._entry_key(layer, first_block)
        entry = self._exact.get(entry_key, {}) if entry_key is not None else {}
        for offset in range(min(self.sink_tokens, key.shape[0])):
            if offset in entry:
                key[offset], value[offset] = entry[offset]


class LayerChain:
    """Hands each layer's reconstruction to the layer above, for cross-layer presets.

    NOTE: vLLM runs the layers of a forward pass in order, and layer ``l + 1`` writes (and
    reads) exactly the slots layer ``l`` wrote (read): every layer shares the block table.
    So the reconstruction layer ``l`` keeps under a key is what layer ``l + 1`` asks for
    under the same key. When it is missing, the layers below are decoded again from their
    pages, ``0 .. l - 1`` (slower, same result). Only the latest layer's entries are held.
    """

    def __init__(self, engine: "EngineCodec"):
        self.engine = engine
        self._pages: dict[int, torch.Tensor] = {}
        self._kept: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def register(self, layer: int, pages: torch.Tensor) -> None:
        """``pages``: the layer's cache as bytes ``[num_blocks, H, block_size, slot_bytes]``."""
        self._pages[layer] = pages

    def pages(self, layer: int) -> torch.Tensor | None:
        return self._pages.get(layer)

    def keep(self, layer: int, key: tuple, reconstruction: tuple[torch.Tensor, torch.Tensor]) -> None:
        self._kept = {k: v for k, v in self._kept.items() if layer - 1 <= k[0] <= layer}
        self._kept[(layer, key)] = reconstruction

    def below(self, layer: int, key: tuple, gather) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Reconstruction of layer ``layer - 1`` for the slots ``gather(pages)`` selects."""
        if not self.engine.codec.cross_layer or layer == 0:
            return None
        kept = self._kept.pop((layer - 1, key), None)
        if kept is not None:
            return kept
        previous = None
        for below in range(layer):
            if below not in self._pages:
                raise RuntimeError(f"seqkv: pages of layer {below} unknown; cannot predict layer {layer}")
            previous = self.engine.decode_slots(below, gather(self._pages[below]), previous)
        return previous


class EngineCodec:
    def __init__(self, config: SeqKVConfig, model_dir: str, num_kv_heads: int, head_dim: int,
                 rope_theta: float | None = None, kv_dtype: torch.dtype = torch.float32):
        """``kv_dtype``: the dtype of the K/V the model hands the backend (vLLM's model dtype);
        the sink table keeps its exact rows in it."""
        self.config = config
        self.preset = config.preset
        self.model_dir = model_dir
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        calibration = None
        if needs_calibration(config.preset):
            calibration = (load(Path(config.calibration), config.preset) if config.calibration
                           else load_for_model(Path(model_dir), config.preset))
        self.codec: KVCodec = make_codec(config.preset, calibration)
        self._layouts: dict[int, SlotLayout] = {}
        # NOTE: one slot size for every layer (vLLM pages are uniform); smaller layouts
        # (the layer-0 token table) use the first bytes of their slot.
        self.slot_bytes = max(self.layout(layer).slot_bytes for layer in self.layers())
        self.chain = LayerChain(self)
        layer0_is_token_table = isinstance(self.layout(0).key, TokenTableCodec)
        self.sinks = SinkTable(self.codec.sink_tokens,
                               self.first_token if layer0_is_token_table else None,
                               config.sink_table_bytes, kv_dtype)
        self.rope_theta = rope_theta
        self._announced: set[int] = set()
        self._kernel_params: dict[tuple[int, torch.device], object] = {}
        self._step_ops: dict[tuple, object] = {}  # decode_step_ops, one per layer
        self._kernel_error: dict[tuple[int, str], float] = {}
        self._layer_rope: dict[int, LayerRope] = {}
        self._default_rope: LayerRope | None = None

    def first_token(self, block: int) -> int | None:
        """Token id at offset 0 of ``block``: head 0's K row id in layer 0's token-table slot."""
        pages = self.chain.pages(0)
        if pages is None:
            return None
        return int(pages[block, 0, 0, :4].contiguous().view(torch.int32)[0])

    def layers(self) -> range:
        return range(max(self.codec.per_layer, default=0) + 1)

    def layout(self, layer: int) -> SlotLayout:
        if layer not in self._layouts:
            key, value = self.codec.codecs_for_layer(layer)
            self._layouts[layer] = SlotLayout(key, value, self.num_kv_heads, self.head_dim)
        return self._layouts[layer]

    def kernel_params(self, layer: int, device: torch.device):
        """The layer's :mod:`vllm_seqkv.kernels` constants on ``device`` (built once), or None
        for a layer whose slots the kernels do not read (layer 0's token table: a row gather),
        which is then decoded by the codec in torch."""
        cache_key = (layer, device)
        found = self._kernel_params.get(cache_key, _MISSING)
        if found is not _MISSING:  # NOTE: every layer asks, every step
            return found
        from vllm_seqkv import kernels
        from vllm_seqkv.codec.base import CodecInputError

        layout = self.layout(layer)
        try:
            params = (None if isinstance(layout.key, TokenTableCodec)
                      else kernels.layer_params(layout, device))
        except (kernels.KernelArgumentError, CodecInputError) as e:
            logger.warning("seqkv: layer %d of preset %s has no kernel params (%s); it is "
                           "decoded by the codec in torch", layer, self.preset, e)
            params = None
        self._kernel_params[cache_key] = params
        return params

    def encode_slots(self, layer: int, key: torch.Tensor, value: torch.Tensor,
                     previous=None) -> torch.Tensor:
        """The codec's encode of K/V ``[T, H, D]`` -> slot bytes ``[T, H, slot_bytes]`` on the
        keys' device. NOTE: the codec's constants live on the CPU, so on a GPU this round-trips
        through host memory; it serves what the kernels do not: layer 0's token table, the
        torch path and the ``SEQKV_KERNELS_CHECK`` references."""
        coded = self.layout(layer).encode(key.cpu(), value.cpu(), _on_cpu(previous))
        return coded.to(key.device)

    def decode_slots(self, layer: int, slots: torch.Tensor, previous=None):
        """The codec's decode of slot bytes ``[T, H, S]`` -> K, V ``[T, H, D]`` (coding frame) on
        the slots' device (see :meth:`encode_slots`): sink rows, cross-layer hand-ups of written
        tokens, layer 0."""
        key, value = self.layout(layer).decode(slots.cpu(), _on_cpu(previous))
        return key.to(slots.device), value.to(slots.device)

    def write(self, layer: int, pages: torch.Tensor, slots: torch.Tensor, key: torch.Tensor,
              value: torch.Tensor) -> None:
        """Code K/V ``[T, H, D]`` (keys in the coding frame) into ``slots [T]`` of ``pages
        [N, H, bs, S]``, through :func:`vllm_seqkv.kernels.write_slots` when a kernel runs, else
        the codec's encode (the kernels' reference). Cross-layer presets predict from the layer
        below's reconstruction of the same slots and keep this layer's for the layer above."""
        from vllm_seqkv import kernels

        block_size = pages.shape[2]
        blocks, offsets = slots // block_size, slots % block_size
        layout = self.layout(layer)
        write_key = ("write", slots.cpu().numpy().tobytes())
        previous = self.chain.below(layer, write_key, lambda p: p[blocks, :, offsets])
        params = self.kernel_params(layer, pages.device)
        if not kernels.runs_kernel(params, pages.device):
            coded = self.encode_slots(layer, key, value, previous)
            pages[blocks, :, offsets, :layout.slot_bytes] = coded
        else:
            kernels.write_slots(key, value, slots, pages, params, _kernel_previous(params, previous))
            coded = pages[blocks, :, offsets, :layout.slot_bytes]
            if CHECK_KERNELS:
                self._check_write(layer, coded, self.encode_slots(layer, key, value, previous))
        if self.codec.cross_layer:
            self.chain.keep(layer, write_key, self.decode_slots(layer, coded, previous))

    def write_tokens(self, layer: int, pages: torch.Tensor, slot_mapping: torch.Tensor, positions: torch.Tensor,
                     key: torch.Tensor, value: torch.Tensor) -> bool:
        """The new tokens' K (post-RoPE, as the model gave them) / V ``[T, H, D]`` into ``slot_mapping
        [T]`` (-1: skipped) at ``positions [T]``, in one fused kernel call (NaN/inf stored as 0 and
        warned, RoPE undone, coded). False, writing nothing, when this layer has no fused write
        on the pages' device (a cross-layer or token-table layer, the torch or Triton path): the
        caller then goes through :meth:`write`."""
        from vllm_seqkv import kernels

        if self.codec.cross_layer or key.shape[0] == 0:
            return False
        params = self.kernel_params(layer, pages.device)
        if params is None or not kernels.runs_kernel(params, pages.device):
            return False
        rope = None
        if self.codec.pre_rope_keys:
            rows = int(positions.max()) + 1 if layer not in self._layer_rope else 0
            rope = self.rope_of(layer, rows).table_on(pages.device)
        nonfinite = kernels.write_tokens_fused(key, value, slot_mapping, positions, pages, params, rope)
        if nonfinite is None:
            return False
        if nonfinite.item():
            self.warn_nonfinite(layer, nonfinite.item(), key.shape[0])
        if CHECK_KERNELS:
            valid = slot_mapping >= 0
            slots = slot_mapping[valid].long()
            block_size = pages.shape[2]
            coded = pages[slots // block_size, :, slots % block_size, :self.layout(layer).slot_bytes]
            clean = [torch.nan_to_num(t[valid].float(), nan=0.0, posinf=0.0, neginf=0.0) for t in (key, value)]
            self._check_write(layer, coded, self.encode_slots(
                layer, self.to_code_frame(clean[0], positions[valid], layer), clean[1]))
        return True

    def _check_write(self, layer: int, coded: torch.Tensor, reference: torch.Tensor) -> None:
        """``SEQKV_KERNELS_CHECK=1``: the write kernel's slot bytes against the codec's encode.
        A float32 summation order may flip a component's code at a decision threshold (see
        :mod:`vllm_seqkv.kernels.write`), so the check is on the fraction of bytes
        that differ, with its own tolerance ``WRITE_CHECK_TOLERANCE``."""
        differ = (coded != reference.to(coded.device)).float().mean().item()
        self._record_kernel_error(layer, differ, "write", "fraction of written bytes differing from the reference",
                                  WRITE_CHECK_TOLERANCE)

    def reconstruct(self, layer: int, pages: torch.Tensor, blocks: torch.Tensor, rows: torch.Tensor,
                    previous) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V in the coding frame ``[R, H, D]`` of ``rows [R]``, indices into the ``M * bs``
        slots of ``blocks [M]`` (``pages [N, H, bs, S]``; one or several sequences' blocks one
        after another, see :class:`~.reads.ReadChunk`), through
        :func:`vllm_seqkv.kernels.reconstruct_blocks` when a kernel runs (Triton on CUDA
        tensors, the C++ ops on CPU tensors; ``SEQKV_KERNELS`` picks), else the codec's decode
        of those rows only (the kernels' reference). ``previous``: the layer below's
        reconstruction ``[R, H, D]`` pair for cross-layer presets, else None."""
        from vllm_seqkv import kernels

        block_size = pages.shape[2]
        params = self.kernel_params(layer, pages.device)
        if not kernels.runs_kernel(params, pages.device):
            return self.decode_slots(layer, gather_slots(pages, blocks, rows), previous)
        previous = _kernel_previous(params, previous)
        if previous is not None:
            previous = tuple(t.new_zeros(blocks.numel() * block_size, *t.shape[1:], dtype=torch.float32)
                             .index_copy_(0, rows, t.float()) for t in previous)
        key, value = kernels.reconstruct_blocks(pages, blocks, params, previous)
        if CHECK_KERNELS:
            self._check_against_reference(layer, pages, blocks, params, previous, key, value)
        return key[rows], value[rows]

    def reconstruct_model_frame(self, layer: int, pages: torch.Tensor, blocks: torch.Tensor, rows: torch.Tensor,
                                positions: torch.Tensor, block_positions: torch.Tensor | None):
        """K as the model applies RoPE (post-RoPE) and V ``[R, H, D]`` of ``rows`` (see
        :meth:`reconstruct`; ``positions [R]`` their positions, ``block_positions [M]`` each
        block's first position), for layers without cross-layer prediction. A kernel rotates the
        keys while rebuilding them when it can (the layer's RoPE table covers the blocks); else
        :meth:`reconstruct` then :meth:`from_code_frame`."""
        from vllm_seqkv import kernels

        if self.codec.cross_layer:
            raise ValueError("cross-layer presets hand the coding frame up: use reconstruct()")
        params = self.kernel_params(layer, pages.device)
        if (self.codec.pre_rope_keys and block_positions is not None and layer in self._layer_rope
                and kernels.runs_kernel(params, pages.device) and rows.numel()):
            table = self._layer_rope[layer].table_on(pages.device)
            if int(block_positions.max()) + pages.shape[2] <= table.shape[0]:
                key, value = kernels.reconstruct_blocks(pages, blocks, params, rope=table,
                                                        block_positions=block_positions)
                if CHECK_KERNELS:
                    self._check_against_reference(layer, pages, blocks, params, None, key, value,
                                                  rope=table, block_positions=block_positions)
                return key[rows], value[rows]
        key, value = self.reconstruct(layer, pages, blocks, rows, None)
        return self.from_code_frame(key, positions, layer), value

    def fused_decode_params(self, layer: int, device: torch.device):
        """The layer's kernel params when its decode can run as one fused kernel over the pages
        (a kernel implementation on ``device``: Triton/CUDA on GPUs, the C++ ops on CPU;
        transform format, not cross-layer), else None.
        NOTE: with a cross-layer preset every layer must hand its reconstruction up to the next
        one, so its decode reconstructs (:meth:`reconstruct`) instead."""
        from vllm_seqkv import kernels

        if self.codec.cross_layer:
            return None
        params = self.kernel_params(layer, device)
        if not isinstance(params, kernels.TransformLayerParams) or not kernels.runs_kernel(params, device):
            return None
        return params

    def decode_step_ops(self, layer: int, pages: torch.Tensor):
        """The layer's :class:`~vllm_seqkv.kernels.cpu_ops.DecodeStepOps` on ``pages`` (built once
        per layer, pages and kernel choice), or None where a decode step goes through
        :meth:`write_tokens` and :meth:`decode_attention` instead: the C++ CPU ops do not run
        this layer (another implementation or device, a cross-layer or token-table layer),
        ``SEQKV_KERNELS_CHECK`` compares every call with the reference, or the layer's RoPE
        carries a magnitude (YaRN's mscale, folded into the query by :meth:`decode_attention`)."""
        from vllm_seqkv import kernels

        choice = kernels.implementation(pages.device)
        key = (layer, pages.data_ptr(), choice)
        found = self._step_ops.get(key, _MISSING)
        if found is not _MISSING:
            return found
        ops = None
        params = self.fused_decode_params(layer, pages.device)
        if (choice == "cpp" and params is not None and not CHECK_KERNELS
                and (not self.fused_decode_rotates_keys or layer in self._layer_rope)):
            layer_rope = self._layer_rope.get(layer) if self.fused_decode_rotates_keys else None
            if layer_rope is None:
                ops = kernels.cpu_ops.DecodeStepOps(params, pages, None, None)
            elif layer_rope.magnitude == 1.0:
                ops = kernels.cpu_ops.DecodeStepOps(params, pages, layer_rope.table_on(pages.device),
                                                    layer_rope.rotation_on(pages.device))
        self._step_ops = {k: v for k, v in self._step_ops.items() if k[0] != layer}  # one per layer
        self._step_ops[key] = ops
        return ops

    def warn_nonfinite(self, layer: int, count: int, tokens: int) -> None:
        logger.warning("seqkv: layer %d: K/V of %d of %d new tokens contain NaN or inf (the model's "
                       "output); stored with those values as 0", layer, count, tokens)

    @property
    def fused_decode_rotates_keys(self) -> bool:
        """Whether the fused decode gets a RoPE table (pre-RoPE keys; cross-layer presets never
        run it): the rule the fixed-memory count of the CPU ops' layer tables follows too."""
        return self.codec.pre_rope_keys and not self.codec.cross_layer

    def decode_attention(self, layer: int, params, query: torch.Tensor, own_k: torch.Tensor,
                         own_v: torch.Tensor, pages: torch.Tensor, block_table: torch.Tensor,
                         seq_lens: list[int], scale: float, lengths: torch.Tensor | None = None,
                         first_blocks: list[int] | None = None, from_position: int | None = None):
        """One query per sequence over its pages, by the fused decode kernel: query ``[B, Hq, D]``,
        own_k/own_v ``[B, H, D]`` (post-RoPE, position ``seq_len - 1``), block_table ``[B, n]``
        -> ``[B, Hq, D]`` float32. The kernel skips the sink positions; their exact rows (coded
        ones where the sink table has none) are merged in by the log-sum-exp (inside the C++
        op). ``lengths`` (``seq_lens`` as an int32 tensor on the pages' device) and
        ``first_blocks`` (``block_table[:, 0]`` as a list): per-batch values a caller may pass
        instead of having every layer rebuild them. ``from_position``: read only the positions
        from there on (past the sink tokens; the rest of a shared prefix, see
        :meth:`decode_shared_prefix`) and return ``(out, lse [B, Hq])``."""
        from vllm_seqkv import kernels

        device = pages.device
        if lengths is None:
            lengths = torch.tensor(seq_lens, dtype=torch.int32, device=device)
        rope = None
        if self.fused_decode_rotates_keys:
            layer_rope = self.rope_of(layer, max(seq_lens))
            rope = layer_rope.rotation_on(device)
            # NOTE: the kernels rotate by pure rotations (composing them); a magnitude the
            # model bakes into cos/sin (YaRN's mscale) scales the cached keys' scores: folded
            # into the query, and taken back out of the exact own key
            if layer_rope.magnitude != 1.0:
                query, own_k = query * layer_rope.magnitude, own_k / layer_rope.magnitude
        sinks = self.codec.sink_tokens
        sink_rows = None
        if from_position is not None:
            if from_position < sinks:
                raise ValueError(f"from_position {from_position} is inside the {sinks} sink positions")
            out, lse = kernels.paged_decode_attention(query, own_k, own_v, pages, block_table, lengths, params,
                                                      scale, rope=rope, skip_first=from_position, return_lse=True)
            if CHECK_KERNELS:
                self._check_decode(layer, params, query, own_k, own_v, pages, block_table, lengths, scale, rope,
                                   out, None, skip_first=from_position)
            return out.float(), lse
        if sinks:
            if first_blocks is None:
                first_blocks = block_table[:, 0].tolist()
            sink_rows = self.sink_rows(layer, pages, first_blocks)  # [B, S0, H, D] each
            if rope is not None and layer_rope.magnitude != 1.0:  # the query above carries the magnitude
                sink_rows = (sink_rows[0] / layer_rope.magnitude, sink_rows[1])
        out, lse = kernels.paged_decode_attention(query, own_k, own_v, pages, block_table, lengths,
                                                  params, scale, rope=rope, skip_first=sinks,
                                                  return_lse=True, sinks=sink_rows)
        if CHECK_KERNELS:
            self._check_decode(layer, params, query, own_k, own_v, pages, block_table, lengths,
                               scale, rope, out, sink_rows)
        return out.float()

    def reads_shared_prefixes(self, params, device: torch.device) -> bool:
        """Whether the fused decode on ``device`` takes a pass without own token
        (:meth:`decode_shared_prefix`): the C++ CPU op does."""
        from vllm_seqkv import kernels

        return kernels.decodes_without_own_token(params, device)

    def decode_shared_prefix(self, layer: int, params, query: torch.Tensor, pages: torch.Tensor,
                             block_table: torch.Tensor, length: int, first_block: int, scale: float):
        """Attention of ``query [n, Hq, D]`` (n sequences, post-RoPE) over the ``length`` positions
        they share (``block_table [1, length / bs]``, sink rows keyed by ``first_block``), read
        once for all n: one fused-decode pass with the queries stacked per KV head as a group of
        ``n * Hq / H`` and no own token -> ``(out [n, Hq, D] float32, lse [n, Hq])``."""
        from vllm_seqkv import kernels
        from vllm_seqkv.integration.decode_plan import stack_sharers, unstack_sharers

        stacked = stack_sharers(query, self.num_kv_heads)
        rope = None
        if self.fused_decode_rotates_keys:
            layer_rope = self.rope_of(layer, length + 1)
            rope = layer_rope.rotation_on(pages.device)
            if layer_rope.magnitude != 1.0:  # as in decode_attention: folded into the query
                stacked = stacked * layer_rope.magnitude
        sinks = self.codec.sink_tokens
        sink_rows = None
        if sinks:
            sink_rows = self.sink_rows(layer, pages, [first_block])
            if rope is not None and layer_rope.magnitude != 1.0:
                sink_rows = (sink_rows[0] / layer_rope.magnitude, sink_rows[1])
        lengths = torch.tensor([length + 1], dtype=torch.int32, device=pages.device)
        out, lse = kernels.paged_decode_attention(stacked, None, None, pages, block_table, lengths,
                                                  params, scale, rope=rope, skip_first=sinks, return_lse=True,
                                                  sinks=sink_rows)
        if CHECK_KERNELS:
            self._check_decode(layer, params, stacked, None, None, pages, block_table, lengths, scale, rope, out,
                               sink_rows)
        out, lse = unstack_sharers(out, lse, query.shape[0], self.num_kv_heads)
        return out.float(), lse

    def sink_rows(self, layer: int, pages: torch.Tensor, first_blocks: list[int]):
        """K (post-RoPE) and V ``[B, S0, H, D]`` of positions ``0 .. S0 - 1`` (``S0`` = sink
        tokens) of sequences starting at ``first_blocks``: exact from the sink table, else
        decoded from the pages."""
        sinks = self.codec.sink_tokens
        exact = self.sinks.all_rows(layer, first_blocks)
        if exact is not None:  # NOTE: float32, exactly the values of the model's rows
            return exact[0].to(pages.device, torch.float32), exact[1].to(pages.device, torch.float32)
        first_blocks = torch.tensor(first_blocks, dtype=torch.long, device=pages.device)
        slots = pages[first_blocks, :, :sinks].transpose(1, 2)  # [B, S0, H, S]
        batch = slots.shape[0]
        key, value = self.decode_slots(layer, slots.reshape(batch * sinks, *slots.shape[2:]))
        positions = torch.arange(sinks, device=pages.device).repeat(batch)
        key = self.from_code_frame(key, positions, layer).reshape(batch, sinks, *key.shape[1:])
        value = value.reshape(batch, sinks, *value.shape[1:])
        for b, block in enumerate(first_blocks.tolist()):
            self.sinks.restore(layer, block, key[b], value[b])
        return key, value

    def set_rope_table(self, layer: int, table: torch.Tensor) -> None:
        """The RoPE the model applies to ``layer``'s keys, as a cos/sin table ``[P, head_dim]``
        (see :mod:`vllm_seqkv.codec.rope`; read from the serving engine's rotary embedding)."""
        if table.dim() != 2 or table.shape[1] != self.head_dim:
            raise ValueError(f"RoPE table of layer {layer}: shape {tuple(table.shape)}, expected "
                             f"[positions, {self.head_dim}]")
        self._layer_rope[layer] = self._shared_rope(table)

    def _shared_rope(self, table: torch.Tensor) -> LayerRope:
        """The :class:`LayerRope` of ``table``: one another layer already has when their tables
        are equal (all layers of most models share one rotary embedding; Gemma-3's local and
        global layers have two), else a new one on its own compact float32 copy (``table`` may
        be a view of a longer cos/sin cache, whose storage it would otherwise keep alive)."""
        for rope in dict.fromkeys(self._layer_rope.values()):
            if rope.table.shape == table.shape and torch.equal(rope.table, table.to(rope.table.dtype)):
                return rope
        return LayerRope(table.to(torch.float32, copy=True).contiguous())

    def rope_tables(self) -> list[LayerRope]:
        """The distinct RoPE tables the layers hold (each shared by the layers whose tables are
        equal): what :mod:`~.fixed_memory` counts as ``rope_tables``."""
        return list(dict.fromkeys(self._layer_rope.values()))

    def has_rope_table(self, layer: int) -> bool:
        return layer in self._layer_rope

    def rope_of(self, layer: int | None, positions: int) -> LayerRope:
        """``layer``'s RoPE (set by :meth:`set_rope_table`), else, where no layer has one (no
        engine: offline tools, device tests), default RoPE of ``rope_theta`` with at least
        ``positions`` rows, grown by powers of two."""
        if layer is not None and layer in self._layer_rope:
            return self._layer_rope[layer]
        if self._layer_rope:
            raise RuntimeError(f"seqkv: no RoPE table for layer {layer}; the other layers have "
                               "their model's own")
        if self.rope_theta is None:
            raise ValueError(f"preset {self.preset} codes keys pre-RoPE: needs the model's RoPE "
                             "(its rotary embedding, or rope_theta for default RoPE)")
        if self._default_rope is None or self._default_rope.table.shape[0] < positions:
            rows = 1 << max(positions - 1, 1).bit_length()
            self._default_rope = LayerRope(default_table(rows, self.head_dim, self.rope_theta))
        return self._default_rope

    def _check_decode(self, layer, params, query, own_k, own_v, pages, block_table, lengths, scale,
                      rope, out, sink_rows, skip_first: int | None = None) -> None:
        """``SEQKV_KERNELS_CHECK=1``: the fused decode against the reference on the engine's pages
        (the sink rows merged by the torch merge)."""
        from vllm_seqkv.kernels.reference import merge_sink_rows, transform_decode_attention_reference

        ref_out, ref_lse = transform_decode_attention_reference(
            query, own_k, own_v, pages, block_table, lengths, params.layout, scale, rope=rope,
            skip_first=self.codec.sink_tokens if skip_first is None else skip_first, return_lse=True)
        if sink_rows is not None:
            ref_out = merge_sink_rows(ref_out, ref_lse, query, sink_rows[0], sink_rows[1], lengths, scale)
        error = (out.float() - ref_out.float().to(out.device)).abs().max().item()
        self._record_kernel_error(layer, error, "fused decode")

    def _check_against_reference(self, layer, pages, blocks, params, previous, key, value, rope=None,
                                 block_positions=None) -> None:
        """``SEQKV_KERNELS_CHECK=1``: compare a kernel's reconstruction with the reference on the
        engine's own pages; log each new worst error, raise beyond ``KERNEL_CHECK_TOLERANCE``."""
        from vllm_seqkv.kernels import TransformLayerParams
        from vllm_seqkv.kernels.reference import (
            reconstruct_blocks_reference,
            reconstruct_transform_reference,
        )

        if isinstance(params, TransformLayerParams):
            ref_k, ref_v = reconstruct_transform_reference(pages, blocks, params.layout, previous, rope=rope,
                                                           block_positions=block_positions)[:2]
        else:  # rotation format
            ref_k, ref_v = reconstruct_blocks_reference(pages, blocks, params.layout)
        error = max((key.float() - ref_k.float()).abs().max().item(),
                    (value.float() - ref_v.float()).abs().max().item())
        self._record_kernel_error(layer, error, "reconstruction")

    def _record_kernel_error(self, layer: int, error: float, what: str,
                             measure: str = "error vs reference",
                             tolerance: float = KERNEL_CHECK_TOLERANCE) -> None:
        """Log each new worst ``measure`` of the kernel doing ``what`` in ``layer``; raise beyond
        ``tolerance``."""
        if error > self._kernel_error.get((layer, what), -1.0):
            self._kernel_error[(layer, what)] = error
            logger.info("seqkv kernels check: layer %d %s, worst %s so far %.3g",
                        layer, what, measure, error)
        if error > tolerance:
            raise RuntimeError(f"seqkv kernels check: layer {layer} {what}: {measure} {error:.3g} "
                               f"(> {tolerance})")

    def to_code_frame(self, key: torch.Tensor, positions: torch.Tensor,
                      layer: int | None = None) -> torch.Tensor:
        """Post-RoPE keys ``[T, H, D]`` of ``layer`` at ``positions [T]`` -> the frame the codec
        codes (the exact inverse of the layer's RoPE table, magnitude included)."""
        if not self.codec.pre_rope_keys or key.shape[0] == 0:
            return key
        rope = self.rope_of(layer, int(positions.max()) + 1)
        return unrotate_by_table(key, rope.table_on(key.device), positions)

    def from_code_frame(self, key: torch.Tensor, positions: torch.Tensor,
                        layer: int | None = None) -> torch.Tensor:
        """Inverse of :meth:`to_code_frame`: the layer's RoPE as the model applies it."""
        if not self.codec.pre_rope_keys or key.shape[0] == 0:
            return key
        rope = self.rope_of(layer, int(positions.max()) + 1)
        return rotate_by_table(key, rope.table_on(key.device), positions)

    def announce(self, pid: int) -> bool:
        first = pid not in self._announced
        self._announced.add(pid)
        return first


class LayerRope:
    """One layer's RoPE: ``table [P, D]`` as the model applies it (see
    :mod:`vllm_seqkv.codec.rope`), and its split into pure rotations times one ``magnitude``
    for the kernels; copies kept per device."""

    def __init__(self, table: torch.Tensor):
        self.table = table
        rotation, self.magnitude = split_table(table)
        if abs(self.magnitude - 1.0) < 1e-6:
            self.magnitude = 1.0
        self._tables = {"cpu": table.cpu()}
        self._rotations = {"cpu": rotation}

    def table_on(self, device: torch.device) -> torch.Tensor:
        if str(device) not in self._tables:
            self._tables[str(device)] = self.table.to(device)
        return self._tables[str(device)]

    def rotation_on(self, device: torch.device) -> torch.Tensor:
        if str(device) not in self._rotations:
            self._rotations[str(device)] = self._rotations["cpu"].to(device)
        return self._rotations[str(device)]


_MISSING = object()


def _on_cpu(previous):
    return None if previous is None else tuple(t.cpu() for t in previous)


def _kernel_previous(params, previous):
    """What a kernel takes as ``previous``: the layer below's reconstruction for cross-layer
    transform layers only (the others are not predicted from it)."""
    from vllm_seqkv.kernels import TransformLayerParams

    if previous is not None and isinstance(params, TransformLayerParams) and params.cross_layer:
        return previous
    return None


_active: EngineCodec | None = None


def start_engine_codec(num_kv_heads: int, head_dim: int) -> EngineCodec:
    """Build (once per engine) the codec for the engine whose model is being constructed."""
    global _active
    from vllm_seqkv.integration.compat import get_current_vllm_config

    vllm_config = get_current_vllm_config()
    config = from_additional_config(vllm_config.additional_config)
    model_dir = vllm_config.model_config.model
    kv_dtype = vllm_config.model_config.dtype
    key = (config, model_dir, num_kv_heads, head_dim, kv_dtype)
    if _active is None or (_active.config, _active.model_dir, _active.num_kv_heads,
                           _active.head_dim, _active.sinks.dtype) != key:
        _active = EngineCodec(config, model_dir, num_kv_heads, head_dim,
                              rope_theta(vllm_config.model_config.hf_config), kv_dtype)
    return _active


def active_engine_codec() -> EngineCodec:
    if _active is None:
        raise RuntimeError("seqkv: no engine codec; the seqkv attention backend was not built")
    return _active
