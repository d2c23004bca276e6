"""seqkv's memory outside vLLM's KV pages, and the part of vLLM's KV budget it takes.

Parts (:class:`FixedMemory`, bytes):

* ``token_table``: layer 0's token tables (``[vocab, H, D]`` K and V, as calibrated) and the
  float32 search copy of head 0 their encode builds (``[vocab, D]`` + squared norms
  ``[vocab]``; :data:`~vllm_seqkv.codec.token_table.SEARCH_HEADS`).
* ``calibration``: every other tensor of the codec (bases, quantizer levels and thresholds,
  predictors).
* ``kernel_params``: the tensors of the kernels' per-layer params that are not the codec's
  own (on CPU they view the codec's tensors: every table the kernels read is the codec's own,
  in the kernels' dtype and layout), and where the C++ CPU ops run (pages on the host), what
  they derive once per layer and keep with the params (key pair blocks and layer tables:
  extraction tables, 16-entry level tables, RoPE tile rotations; ``cpu_ops.layer_args``).
* ``rope_tables``: for pre-RoPE presets, each distinct cos/sin table and its pure-rotation
  split, float32 ``[max_model_len, D]`` each (the backend keeps ``max_model_len`` rows, one
  copy shared by every layer whose table is equal: one for most models, two for Gemma-3's
  local and global layers).
* ``sink_table``: :class:`~.engine_codec.SinkTable`, at most ``sink_table_bytes`` and at most
  one entry per sequence start that can exist: per block (keyed by block), or per distinct
  first token of the blocks holding a start (keyed by first token: at most ``min(vocab,
  blocks)``), each ``layers x sink_tokens x H x D`` K and V in the model's dtype (the dtype of
  the K/V vLLM hands the backend).
* ``scratch``: a bound on the largest per-step buffers (a read chunk's float32 K/V, the
  token-table search scores). Like vLLM's own activations it is not part of an explicit KV
  budget; vLLM's memory profile (when it profiles) runs a forward through seqkv and sees it.

What is taken from the budget vLLM gives the pages (:meth:`FixedMemory.taken`):

* ``--kv-cache-memory-bytes`` (an explicit budget, vLLM measures nothing): every persistent
  part that lives where the pages do. On CPU: token table, calibration, kernel params, RoPE
  tables, sink table. On GPU (codec constants stay on the host): kernel params, RoPE tables
  and sink table (device copies).
* a profiled budget (``--gpu-memory-utilization``; on CPU without an explicit size): only the
  sink table, the one part that grows after vLLM's measurement (the others exist when the
  model is loaded, and vLLM's profile or warm-up forward builds the lazy ones).

The invariant (:meth:`FixedMemory.blocks_within`): vLLM gets the largest ``n`` blocks with
``n * bytes_per_block + taken(n) <= budget`` (``taken`` depends on ``n`` through the sink
table's per-block bound).

NOTE: figures are per worker (``H`` is the worker's KV heads; with tensor parallelism each
rank holds its share of the heads' tables). Tensor bytes only: Python object overhead of the
sink table's entries is not counted (as ``SinkTable.nbytes``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from vllm_seqkv.codec.token_table import SEARCH_CHUNK, SEARCH_HEADS, TokenTableCodec
from vllm_seqkv.integration.reads import ROWS_PER_CHUNK

FLOAT32_BYTES = 4
PARTS = ("token_table", "calibration", "kernel_params", "rope_tables", "sink_table", "scratch")


class FixedMemoryError(ValueError):
    """The KV budget cannot hold seqkv's fixed memory and one block of pages."""


@dataclass(frozen=True)
class FixedMemory:
    token_table: int
    calibration: int
    kernel_params: int
    kernel_params_on_device: int  # all of the params' own tensors (a GPU holds copies)
    rope_tables: int
    sink_table_bytes: int  # the config's bound
    sink_entry_bytes: int  # one sequence start's exact rows, every layer
    sink_entries_by_token: int | None  # vocabulary size when keyed by first token, else None
    scratch: int

    def sink_table(self, num_blocks: int) -> int:
        """Bound on the sink table's bytes with ``num_blocks`` blocks of pages."""
        entries = num_blocks if self.sink_entries_by_token is None else min(num_blocks, self.sink_entries_by_token)
        return min(self.sink_table_bytes, entries * self.sink_entry_bytes)

    def parts(self, num_blocks: int) -> dict[str, int]:
        """Every part by name (:data:`PARTS`) with ``num_blocks`` blocks of pages."""
        return {"token_table": self.token_table, "calibration": self.calibration,
                "kernel_params": self.kernel_params, "rope_tables": self.rope_tables,
                "sink_table": self.sink_table(num_blocks), "scratch": self.scratch}

    def taken_parts(self, whole_budget: bool, kv_on_host: bool) -> tuple[str, ...]:
        """Names of the parts taken from the KV budget (see the module docstring)."""
        if not whole_budget:
            return ("sink_table",)
        if kv_on_host:
            return ("token_table", "calibration", "kernel_params", "rope_tables", "sink_table")
        return ("kernel_params", "rope_tables", "sink_table")

    def taken(self, num_blocks: int, whole_budget: bool, kv_on_host: bool) -> int:
        """Bytes of the KV budget kept for seqkv's fixed memory with ``num_blocks`` blocks.
        ``whole_budget``: the budget is explicit (``--kv-cache-memory-bytes``), not profiled."""
        parts = self.parts(num_blocks)
        if whole_budget and not kv_on_host:
            parts["kernel_params"] = self.kernel_params_on_device
        return sum(parts[name] for name in self.taken_parts(whole_budget, kv_on_host))

    def blocks_within(self, budget: int, bytes_per_block: int, whole_budget: bool,
                      kv_on_host: bool) -> int:
        """Largest ``n >= 0`` with ``n * bytes_per_block + taken(n) <= budget`` (0 if none)."""
        def fits(n: int) -> bool:
            return n * bytes_per_block + self.taken(n, whole_budget, kv_on_host) <= budget

        low, high = 0, max(budget, 0) // bytes_per_block  # fits(low) unless nothing fits
        if not fits(0):
            return 0
        while low < high:  # NOTE: n * bytes_per_block + taken(n) grows with n
            middle = (low + high + 1) // 2
            low, high = (middle, high) if fits(middle) else (low, middle - 1)
        return low

    def budget_for(self, blocks: int, bytes_per_block: int, whole_budget: bool, kv_on_host: bool) -> int:
        """The smallest budget for which :meth:`blocks_within` gives ``blocks`` blocks."""
        return blocks * bytes_per_block + self.taken(blocks, whole_budget, kv_on_host)

    def as_dict(self) -> dict[str, int | None]:
        return asdict(self)


def fixed_memory_of(engine, num_layers: int, max_model_len: int, rope_tables: int = 1,
                    pages_on_cpu: bool = True) -> FixedMemory:
    """Measure ``engine``'s (an :class:`~.engine_codec.EngineCodec`) fixed memory for a model
    of ``num_layers`` attention layers served up to ``max_model_len`` positions, whose layers
    apply ``rope_tables`` distinct RoPE tables. Builds the kernel params on the CPU to measure
    them (and drops them); with ``pages_on_cpu`` also what the C++ CPU ops derive from them."""
    from vllm_seqkv import kernels
    from vllm_seqkv.codec.base import CodecInputError

    heads, dim = engine.num_kv_heads, engine.head_dim
    tables = _token_tables(engine)
    token_table = sum(table.nbytes + _search_bytes(table) for table in tables)
    codec_storages = tensor_storages(engine.codec, skip=(TokenTableCodec,))
    table_storages = tensor_storages(tables)
    calibration = sum(size for key, size in codec_storages.items() if key not in table_storages)
    params_storages: dict[int, int] = {}
    built = []  # NOTE: kept alive while measuring, so that no two share a freed address
    for layer in engine.layers():
        layout = engine.layout(layer)
        if isinstance(layout.key, TokenTableCodec):
            continue
        try:
            params = kernels.layer_params(layout, torch.device("cpu"))
        except (kernels.KernelArgumentError, CodecInputError):
            continue  # decoded by the codec in torch: no params
        if pages_on_cpu:
            _derive_cpu_op_tables(engine, params)
        own = {name: value for name, value in vars(params).items() if name != "layout"}
        built.append(own)
        params_storages.update(tensor_storages(own))
    kernel_params = sum(size for key, size in params_storages.items() if key not in codec_storages)
    rope_bytes = (rope_tables * 2 * max_model_len * dim * FLOAT32_BYTES
                  if engine.codec.pre_rope_keys else 0)
    sink_tokens = engine.codec.sink_tokens
    sink_entry = num_layers * sink_tokens * heads * dim * 2 * engine.sinks.dtype.itemsize
    vocab = tables[0].shape[0] if tables else None
    read_chunk = max(ROWS_PER_CHUNK, max_model_len) * heads * dim * 2 * FLOAT32_BYTES
    search_scores = SEARCH_HEADS * SEARCH_CHUNK * vocab * FLOAT32_BYTES if tables else 0
    return FixedMemory(
        token_table=token_table, calibration=calibration, kernel_params=kernel_params,
        kernel_params_on_device=sum(params_storages.values()), rope_tables=rope_bytes,
        sink_table_bytes=engine.config.sink_table_bytes if sink_tokens else 0,
        sink_entry_bytes=sink_entry, sink_entries_by_token=vocab if engine.sinks.by_token else None,
        scratch=read_chunk + search_scores)


def _derive_cpu_op_tables(engine, params) -> None:
    """Build in ``params.derived`` what the C++ CPU ops keep per layer when they serve it (see
    ``cpu_ops.layer_args``): the decode's layer tables (with RoPE tile rotations for pre-RoPE
    presets whose decode the op runs), else the write's. Their size does not depend on the
    pages or the RoPE values, so one page of one slot and a zero table stand in for them."""
    from vllm_seqkv import kernels
    from vllm_seqkv.kernels import cpu_ops

    cpu = torch.device("cpu")
    if kernels.implementation(cpu) != "cpp" or not kernels.runs_kernel(params, cpu):
        return
    pages = torch.zeros(1, params.num_kv_heads, 1, params.slot_bytes, dtype=torch.uint8)
    rope = torch.zeros(16, params.head_dim) if engine.fused_decode_rotates_keys else None
    cpu_ops.layer_args(params).layer_tables(pages, rope)


def describe(fixed: FixedMemory, num_blocks: int, whole_budget: bool, kv_on_host: bool) -> str:
    """One line: every part, and what the budget gave up for which parts."""
    parts = ", ".join(f"{name.replace('_', ' ')} {size:,}" for name, size in fixed.parts(num_blocks).items())
    taken = fixed.taken(num_blocks, whole_budget, kv_on_host)
    names = " + ".join(fixed.taken_parts(whole_budget, kv_on_host)).replace("_", " ")
    return (f"{parts} bytes (sink table: bound at {num_blocks} blocks, sink_table_bytes "
            f"{fixed.sink_table_bytes:,}; scratch: bound, never taken); taken from the "
            f"{'--kv-cache-memory-bytes' if whole_budget else 'profiled'} KV budget: {taken:,} "
            f"bytes ({names})")


def _token_tables(engine) -> list[torch.Tensor]:
    tables = []
    for layer in engine.layers():
        layout = engine.layout(layer)
        for codec in (layout.key, layout.value):
            if isinstance(codec, TokenTableCodec) and all(codec.table is not t for t in tables):
                tables.append(codec.table)
    return tables


def _search_bytes(table: torch.Tensor) -> int:
    """The float32 search copy of the searched heads ``[SEARCH_HEADS, vocab, D]`` and their
    squared norms ``[SEARCH_HEADS, vocab]`` an encode builds."""
    vocab, heads, dim = table.shape
    return min(heads, SEARCH_HEADS) * vocab * (dim + 1) * FLOAT32_BYTES


def tensor_storages(root, skip: tuple[type, ...] = ()) -> dict[int, int]:
    """``{storage address: bytes}`` of every tensor reachable from ``root`` through object
    attributes, dicts, lists and tuples (each storage once), not entering ``skip`` types."""
    found: dict[int, int] = {}
    seen: set[int] = set()
    stack = [root]
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, skip):
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            found[storage.data_ptr()] = storage.nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set)):
            stack.extend(item)
        elif hasattr(item, "__dict__") and not isinstance(item, type) and not callable(item):
            stack.extend(vars(item).values())
    return found
