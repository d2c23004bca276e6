"""Calibration activations captured inside vLLM's own engine (its device, dtype and TP layout).

:func:`capture` runs the calibration windows through ``LLM.generate`` (one prefill each,
exact cache: ``kv_cache_dtype`` auto, prefix caching off, eager mode so module hooks run)
and, through ``LLM.apply_model`` on every worker, hooks each attention layer:

- a forward pre-hook on the layer's attention block (the module holding ``rotary_emb``)
  says which layer runs (vLLM shares one rotary module between layers);
- a pre-hook on ``rotary_emb(positions, q, k)``: pre-RoPE q and k after any q/k norm
  (Qwen3, Gemma3), so the keys are the ones the codec sees (channels reordered as the served
  path reorders them for partial or interleaved rotations: :func:`vllm_seqkv.codec.rope.
  channel_order`);
- a pre-hook on vLLM's ``Attention`` layer: v;
- a pre-hook on the model: the token ids of the batch (same flattened order as q/k/v).

Workers keep one chunk of windows (copied to host memory in the capture dtype) and the
driver drains them after each chunk into preallocated buffers: peak host memory is the
captured K/V, ``tokens x layers x kv_heads x head_dim x 2 x dtype bytes``, plus the engine
(weights + ``kv_cache_memory_bytes``) and one chunk. Query second moments are summed in
float64 on the workers; ``o_proj`` metrics come from the loaded weights. With tensor
parallelism each rank sees its own heads; :func:`_merge_ranks` puts them back in global
head order (K/V from the first rank holding a head, q statistics and ``o_proj`` metrics
summed over the ranks sharing a replicated KV head).

The layer-0 token table (only for presets that use it) is the model's forward of every
vocabulary id at position 0, stopped at layer 0's attention (before any cache access).
All vLLM coupling goes through :mod:`.compat`.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vllm_seqkv.codec.calibration import CalibrationError, Capture
from vllm_seqkv.codec.token_table import verify

CHUNK_WINDOWS = 8  # windows per generate call (one drain): bounds the workers' buffers
TABLE_CHUNK = 4096  # vocabulary ids per layer-0 table forward
_STATE = "_seqkv_capture"


class _StopAtLayer0(Exception):
    pass


@dataclass
class _Layer:
    index: int
    block: torch.nn.Module  # holds rotary_emb and o_proj
    attention: torch.nn.Module
    kv_heads: int
    group: int
    head_dim: int


@dataclass
class _WorkerState:
    """What one worker captured since the last drain (host memory, capture dtype)."""

    layers: list[_Layer]
    store_dtype: torch.dtype
    handles: list = field(default_factory=list)
    current: int | None = None
    mode: str = "sequence"  # "sequence" | "table"
    ids: list[torch.Tensor] = field(default_factory=list)
    keys: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    values: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    query_sq: torch.Tensor | None = None  # [L, kv_local, D] float64 sums over tokens
    rows: int = 0


# --- worker side (called through LLM.apply_model; module-level so they pickle by name) ---

def _find_layers(model: torch.nn.Module) -> list[_Layer]:
    from vllm_seqkv.integration import compat

    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, compat.Attention) or "." not in name:
            continue
        block = model.get_submodule(name.rsplit(".", 1)[0])
        if not hasattr(block, "rotary_emb") or not hasattr(block, "o_proj"):
            raise CalibrationError(
                f"the capture cannot read {type(model).__name__}: attention block {name} has no "
                "rotary_emb/o_proj (seqkv codes RoPE models with an o_proj)")
        index = compat.extract_layer_index(name)
        kv_heads, heads = int(module.num_kv_heads), int(module.num_heads)
        found[index] = _Layer(index, block, module, kv_heads, heads // kv_heads, int(module.head_size))
    if not found or sorted(found) != list(range(len(found))):
        raise CalibrationError(f"the capture cannot read {type(model).__name__}: attention layers "
                               f"{sorted(found)} are not 0..L-1")
    return [found[i] for i in range(len(found))]


def _first(args, kwargs, position: int, name: str):
    return args[position] if len(args) > position else kwargs.get(name)


def _channel_order(rotary) -> torch.Tensor | None:
    """The channel order (see :func:`vllm_seqkv.codec.rope.channel_order`) of one of vLLM's
    rotary embeddings, on the host (moved to the tensors' device where used), None for
    full-width neox; raises :class:`CalibrationError` for one seqkv cannot reorder."""
    from vllm_seqkv.codec.rope import channel_order

    try:
        order = channel_order(int(rotary.rotary_dim), int(rotary.head_size), bool(rotary.is_neox_style))
    except (AttributeError, ValueError) as exc:
        raise CalibrationError(f"the capture cannot read {type(rotary).__name__}'s rotation "
                               f"({type(exc).__name__}: {exc})") from None
    return order


def worker_start(model: torch.nn.Module, store_dtype: str) -> dict:
    """Install the hooks; returns this rank's layout."""
    from vllm_seqkv.integration import compat

    if hasattr(model, _STATE):
        worker_finish(model)
    layers = _find_layers(model)
    state = _WorkerState(layers, getattr(torch, store_dtype))
    first = layers[0]
    state.query_sq = torch.zeros(len(layers), first.kv_heads, first.head_dim, dtype=torch.float64)
    setattr(model, _STATE, state)

    def on_model(_module, args, kwargs):
        ids = _first(args, kwargs, 0, "input_ids")
        if ids is None:
            raise CalibrationError("the capture needs input_ids (the model was called with embeddings)")
        state.ids.append(ids.detach().reshape(-1).to("cpu", torch.int64))

    def on_block(layer):
        def hook(_module, _args, _kwargs):
            state.current = layer.index
        return hook

    def on_rotary(module, args, kwargs):
        layer = layers[state.current]
        q, k = _first(args, kwargs, 1, "query"), _first(args, kwargs, 2, "key")
        if k is None:
            raise CalibrationError("the capture needs rotary_emb(positions, q, k) with keys")
        tokens = q.shape[0]
        order = orders[id(module)]
        order = None if order is None else order.to(k.device)
        if state.mode == "sequence":
            qg = q.detach().reshape(tokens, layer.kv_heads, layer.group, layer.head_dim)
            qg = qg if order is None else qg[..., order]
            state.query_sq[layer.index] += qg.double().pow(2).mean(2).sum(0).cpu()
        keep = k.detach().reshape(tokens, layer.kv_heads, layer.head_dim)
        keep = keep if order is None else keep[..., order]
        state.keys.setdefault(layer.index, []).append(keep.to("cpu", state.store_dtype, copy=True))

    def on_attention(layer):
        def hook(_module, args, kwargs):
            v = _first(args, kwargs, 2, "value")
            keep = v.detach().reshape(v.shape[0], layer.kv_heads, layer.head_dim)
            state.values.setdefault(layer.index, []).append(keep.to("cpu", state.store_dtype, copy=True))
            if state.mode == "table":
                raise _StopAtLayer0
        return hook

    rotaries = {}
    state.handles.append(model.register_forward_pre_hook(on_model, with_kwargs=True))
    for layer in layers:
        state.handles.append(layer.block.register_forward_pre_hook(on_block(layer), with_kwargs=True))
        state.handles.append(layer.attention.register_forward_pre_hook(on_attention(layer),
                                                                       with_kwargs=True))
        rotaries[id(layer.block.rotary_emb)] = layer.block.rotary_emb
    # partial / interleaved rotations: q and k in the channel order the served path uses
    orders = {key: _channel_order(rotary) for key, rotary in rotaries.items()}
    for rotary in rotaries.values():
        state.handles.append(rotary.register_forward_pre_hook(on_rotary, with_kwargs=True))
    rank, size = compat.tensor_parallel_rank_and_size()
    return {"rank": rank, "size": size, "layers": len(layers), "kv_heads": first.kv_heads,
            "group": first.group, "head_dim": first.head_dim,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}


def worker_drain(model: torch.nn.Module) -> dict:
    """What was captured since the last drain: ``ids [N]``, per layer K/V ``[N, kv_local, D]``."""
    state: _WorkerState = getattr(model, _STATE)
    out = {"ids": torch.cat(state.ids) if state.ids else torch.zeros(0, dtype=torch.int64),
           "keys": [torch.cat(state.keys.get(i, [])) if state.keys.get(i) else None
                    for i in range(len(state.layers))],
           "values": [torch.cat(state.values.get(i, [])) if state.values.get(i) else None
                      for i in range(len(state.layers))]}
    state.ids, state.keys, state.values = [], {}, {}
    return out


def worker_finish(model: torch.nn.Module) -> dict:
    """Remove the hooks; return the query sums and the ``o_proj`` metric of this rank's heads
    (``[L, kv_local, D, D]`` float64: ``Σ_g W_o^{(g)T} W_o^{(g)}`` over its query heads)."""
    state: _WorkerState = getattr(model, _STATE)
    for handle in state.handles:
        handle.remove()
    delattr(model, _STATE)
    from vllm_seqkv.integration import compat

    metrics = []
    for layer in state.layers:
        try:
            weight = compat.local_linear_weight(layer.block.o_proj)
        except (AttributeError, RuntimeError, TypeError) as exc:
            raise CalibrationError(f"the capture cannot read layer {layer.index}'s o_proj "
                                   f"({type(exc).__name__}: {exc})") from None
        w = weight.detach().double().cpu().view(-1, layer.kv_heads, layer.group, layer.head_dim)
        metrics.append(torch.einsum("ohgd,ohge->hde", w, w))
    return {"query_sq": state.query_sq, "value_metric": torch.stack(metrics)}


def worker_layer0_table(model: torch.nn.Module, vocab: int, chunk: int = TABLE_CHUNK) -> dict:
    """Layer 0's pre-RoPE K and V ``{"keys", "values"}: [vocab, kv_local, D]`` for every
    vocabulary id at position 0 (the forward stops at layer 0's attention, before any cache
    access). NOTE: a dict, as :func:`worker_drain`: the engine's RPC encoding keeps dicts of
    tensors but not tuples of them."""
    state: _WorkerState = getattr(model, _STATE)
    state.mode = "table"
    device = next(model.parameters()).device
    keys, values = [], []
    try:
        with torch.no_grad():
            for start in range(0, vocab, chunk):
                ids = torch.arange(start, min(start + chunk, vocab), device=device)
                try:
                    model(input_ids=ids, positions=torch.zeros_like(ids))
                except _StopAtLayer0:
                    pass
                keys.append(state.keys.pop(0)[0])
                values.append(state.values.pop(0)[0])
                state.keys, state.values, state.ids = {}, {}, []
    finally:
        state.mode = "sequence"
    return {"keys": torch.cat(keys), "values": torch.cat(values)}


# --- driver side ---------------------------------------------------------------------------

def _merge_heads(parts: list[torch.Tensor | None], layouts: list[dict], dim: int = 1) -> torch.Tensor:
    """Per-rank tensors with local KV heads on ``dim`` -> global head order (a replicated head
    is taken from the first rank holding it)."""
    chosen, seen = [], set()
    for part, layout in zip(parts, layouts):
        for local, head in enumerate(_global_heads(layout)):
            if head not in seen:
                seen.add(head)
                chosen.append((head, part.select(dim, local)))
    return torch.stack([t for _, t in sorted(chosen, key=lambda x: x[0])], dim)


def _global_heads(layout: dict) -> list[int]:
    """Global KV head ids on a TP rank (vLLM's QKVParallelLinear: split when the KV heads are
    at least the TP size, else each head replicated on ``size / total`` ranks)."""
    rank, size, local = layout["rank"], layout["size"], layout["kv_heads"]
    total = layout["total_kv_heads"]
    if total >= size:
        return list(range(rank * local, (rank + 1) * local))
    return [rank // (size // total)]


def _merge_ranks(finals: list[dict], layouts: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Query sums and ``o_proj`` metrics summed over the ranks sharing each global KV head;
    returns (E[q²] ``[L, H, D]`` still summed over tokens, divided by group size, metric)."""
    total = layouts[0]["total_kv_heads"]
    first = finals[0]["query_sq"]
    query = torch.zeros(first.shape[0], total, first.shape[2], dtype=torch.float64)
    metric = torch.zeros(first.shape[0], total, *finals[0]["value_metric"].shape[2:], dtype=torch.float64)
    group = torch.zeros(total)
    for final, layout in zip(finals, layouts):
        for local, head in enumerate(_global_heads(layout)):
            query[:, head] += final["query_sq"][:, local] * layout["group"]
            metric[:, head] += final["value_metric"][:, local]
            group[head] += layout["group"]
    return query / group.view(1, -1, 1).double(), metric


def calibration_windows(ids: list[int], window: int) -> list[list[int]]:
    """The prompts of a capture: consecutive ``window``-token slices (same as the oracle)."""
    return [ids[start : start + window] for start in range(0, len(ids) - 1, window)]


def engine_kv_bytes(model_dir: Path, tokens: int) -> int:
    """KV memory for ``tokens`` tokens of ``model_dir`` in fp32 (an upper bound for any dtype),
    at least 64 MiB and one 128-token block per layer's worth of slack."""
    import json

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    per_token = cfg["num_hidden_layers"] * cfg.get("num_key_value_heads", heads) * head_dim * 2 * 4
    return max(64 << 20, (tokens + 1024) * per_token)


def capture(model_dir: Path, ids: list[int], *, window: int = 512, dtype: str = "auto",
            layer0_table: bool = False, tensor_parallel_size: int = 1,
            chunk_windows: int = CHUNK_WINDOWS, layer0_tolerance: float | None = None,
            engine_options: dict | None = None, progress: bool = True) -> Capture:
    """Capture the fit's statistics over the token ``ids`` (``window``-token prompts) inside
    a vLLM engine of ``model_dir`` (``dtype``: vLLM's model dtype; K/V are kept in it)."""
    from tqdm import tqdm

    from vllm_seqkv.integration import compat

    LLM, SamplingParams = compat.offline_engine()
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model's callables
    windows = calibration_windows(ids, window)
    batch = chunk_windows * window
    options = dict(model=str(model_dir), dtype=dtype, enforce_eager=True,
                   enable_prefix_caching=False, kv_cache_dtype="auto",
                   max_model_len=max(window + 32, 256), max_num_batched_tokens=max(batch, 2048),
                   kv_cache_memory_bytes=engine_kv_bytes(model_dir, batch),
                   tensor_parallel_size=tensor_parallel_size, seed=0,
                   additional_config={"kv_cache_backend": "auto"})
    options.update(engine_options or {})
    llm = LLM(**options)
    try:
        layouts = llm.apply_model(functools.partial(worker_start, store_dtype=_store_dtype(llm)))
        total_kv = llm.llm_engine.model_config.get_total_num_kv_heads()
        for layout in layouts:
            layout["total_kv_heads"] = total_kv
        first = layouts[0]
        store = getattr(torch, first["dtype"])
        keys = [torch.empty(len(ids), total_kv, first["head_dim"], dtype=store) for _ in range(first["layers"])]
        values = [torch.empty_like(k) for k in keys]
        token_ids = torch.empty(len(ids), dtype=torch.int64)
        filled = 0
        params = SamplingParams(max_tokens=1, temperature=0.0)
        chunks = range(0, len(windows), chunk_windows)
        for start in tqdm(chunks, desc="[seqkv] calibration forward (vLLM)", unit="chunk",
                          disable=not progress, file=sys.stderr):
            prompts = [{"prompt_token_ids": w} for w in windows[start : start + chunk_windows]]
            llm.generate(prompts, params, use_tqdm=False)
            drained = llm.apply_model(worker_drain)
            rows = drained[0]["ids"].numel()
            if filled + rows > len(ids) or any(k is None for k in drained[0]["keys"]):
                raise CalibrationError(f"the capture read {filled + rows} token rows for {len(ids)} "
                                       "tokens (did the engine pad the batch or skip a layer?)")
            token_ids[filled : filled + rows] = drained[0]["ids"]
            for layer in range(first["layers"]):
                keys[layer][filled : filled + rows] = _merge_heads([d["keys"][layer] for d in drained], layouts)
                values[layer][filled : filled + rows] = _merge_heads([d["values"][layer] for d in drained], layouts)
            filled += rows
        if filled != len(ids) or not torch.equal(token_ids, torch.tensor(ids)):
            raise CalibrationError(f"the capture read {filled} token rows in another order than the "
                                   f"{len(ids)} calibration tokens")
        table = None
        if layer0_table:
            vocab = llm.llm_engine.model_config.get_vocab_size()
            parts = llm.apply_model(functools.partial(worker_layer0_table, vocab=vocab))
            table = (_merge_heads([p["keys"] for p in parts], layouts),
                     _merge_heads([p["values"] for p in parts], layouts))
        finals = llm.apply_model(worker_finish)
    finally:
        _close(llm)
    query_sq, value_metric = _merge_ranks(finals, layouts)
    check = "not built (the preset does not use it)"
    if table is not None:
        tolerance = layer0_tolerance or (1e-3 if store == torch.float32 else 2e-2)
        verified, check = verify(table, token_ids, keys[0].float(), values[0].float(), tolerance)
        table = table if verified else None
    return Capture(Path(model_dir).name, keys, values, (query_sq / len(ids)).float(),
                   value_metric.float(), token_ids, table, check)


def _store_dtype(llm) -> str:
    return str(llm.llm_engine.model_config.dtype).removeprefix("torch.")


def _close(llm) -> None:
    """Free the engine now (its memory, its worker processes) rather than at exit."""
    engine = getattr(llm, "llm_engine", None)
    shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
    if callable(shutdown):
        shutdown()
    del llm
    import gc

    gc.collect()


def capture_bytes(tokens: int, layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Host memory of the captured K/V (the driver's buffers): the formula the docs quote."""
    return tokens * layers * kv_heads * head_dim * 2 * dtype_bytes


__all__ = ["capture", "capture_bytes", "calibration_windows", "engine_kv_bytes"]
