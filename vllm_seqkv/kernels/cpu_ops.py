"""Python side of the C++ CPU ops (``torch.ops.seqkv.cpu_*``, built as ``vllm_seqkv._cpu`` from
``csrc/cpu/`` on every machine by ``setup.py``).

Transform format (:class:`TransformLayerParams`), streams WITHOUT cross-layer prediction
(``seqkv-3-nox`` and every non-predicted layer); the same contracts as the Triton wrappers:

- :func:`transform_decode_attention_cpp`: the fused paged decode (``fused_transform_decode_attention``);
- :func:`write_transform_slots_cpp`: the write (bytes identical to the codec's: the components
  ``z = (x - mean) @ basis`` are computed here with the codec's own einsum, the op quantizes,
  packs and stores);
- :func:`write_transform_tokens_cpp`: the engine's write in one op, from the model's K/V (NaN/inf
  check, RoPE undone, components, codes: the codec's bytes up to threshold flips, see there);
- :func:`reconstruct_transform_blocks_cpp`: whole blocks to float32 K (optionally RoPE-rotated)
  and V, for prefill.

What the ops derive from a layer's tables independently of the tokens (extraction tables,
16-entry level tables, RoPE tile rotations: ``cpu_transform_layer_tables``) is built once per
params object and RoPE table and passed to every call (:func:`layer_args`; the op checks that it
was built from the call's very tensors). Argument checks: the ops check every argument
themselves; the wrappers of the engine's per-layer calls (decode, write of tokens) check the
params here and, when the op refuses a call, every other argument, to name the wrong one (a
check costs ~1 µs of Python, and a decode step makes two such calls per layer).

``load_cpu_ops()`` imports the extension once and returns False (never raises) when it is
missing or fails to load; :func:`load_error` says why. Keys whose inverse basis is
"RoPE-pair block diagonal" (``inverse[c, d] == 0`` unless ``c`` and ``d`` are in the same pair
``{j, j + D/2}``) take the kernels' O(1)-per-pair key path: detected once per params
(:func:`key_pairs`). Argument errors raise :class:`KernelArgumentError`.
"""

from __future__ import annotations

import weakref

import torch

from vllm_seqkv.kernels.checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    KernelArgumentError,
    check_decode_inputs,
    check_pages,
    check_tensor,
    expect,
)
from vllm_seqkv.kernels.params import TransformLayerParams, stream_format, stream_tables

_loaded: bool | None = None
_error: str = ""


def load_cpu_ops() -> bool:
    """Import ``vllm_seqkv._cpu`` (registers torch.ops.seqkv.cpu_*) once; False when it is not
    built or does not load (then :func:`load_error` says why)."""
    global _loaded, _error
    if _loaded is None:
        try:
            import vllm_seqkv._cpu  # noqa: F401
        except Exception as e:  # ImportError, OSError (bad .so), undefined symbols...
            _loaded, _error = False, f"{type(e).__name__}: {e}"
        else:
            try:
                _register_fakes()
            except Exception as e:  # a torch without register_fake: the ops still run eagerly
                _error = f"fake implementations not registered ({e})"
            _loaded = True
    return _loaded


def load_error() -> str:
    return _error


def active_isa() -> str:
    """The instruction set the kernels run ("avx512", "avx2" or "scalar")."""
    return torch.ops.seqkv.cpu_kernel_isa("") if load_cpu_ops() else "none"


def _register_fakes() -> None:
    @torch.library.register_fake("seqkv::cpu_transform_decode_attention")
    def _(query, *args):
        return query.new_empty(query.shape), query.new_empty(query.shape[:2], dtype=torch.float32)

    @torch.library.register_fake("seqkv::cpu_reconstruct_transform_blocks")
    def _(pages, block_ids, *args):
        shape = (block_ids.shape[0] * pages.shape[2], pages.shape[1], args[2][7].shape[-1])
        return pages.new_empty(shape, dtype=torch.float32), pages.new_empty(shape, dtype=torch.float32)

    @torch.library.register_fake("seqkv::cpu_write_transform_slots")
    def _(*args):
        return None

    @torch.library.register_fake("seqkv::cpu_write_transform_tokens")
    def _(key, *args):
        return key.new_empty((), dtype=torch.int64)


def _require_ops() -> None:
    if not load_cpu_ops():
        raise RuntimeError(f"seqkv C++ CPU kernels are not built ({_error}); run `bash scripts/setup.sh` "
                           "or `python setup.py build_ext --inplace`")


def pair_blocks(inverse: torch.Tensor) -> torch.Tensor | None:
    """``inverse [H, D, D]`` -> its 2x2 RoPE-pair blocks float32 ``[4, H, D/2]`` (a, b, c, d:
    ``k[j] = z_j a + z_j' b``, ``k[j'] = z_j c + z_j' d``, ``j' = j + D/2``), or None when some
    entry outside the pairs is nonzero."""
    heads, dim, _ = inverse.shape
    half = dim // 2
    j = torch.arange(dim)
    partner = (j + half) % dim
    outside = torch.ones(dim, dim, dtype=torch.bool)
    outside[j, j] = False
    outside[j, partner] = False
    if bool((inverse[:, outside] != 0).any()):
        return None
    lo, hi = torch.arange(half), torch.arange(half, dim)
    inv = inverse.float()
    return torch.stack([inv[:, lo, lo], inv[:, hi, lo], inv[:, lo, hi], inv[:, hi, hi]]).contiguous()


class _LayerArgs:
    """What every op call of one layer passes besides the tokens, built once per params object:
    the stream tables and formats, the key pair blocks, and the ops' layer tables
    (``cpu_transform_layer_tables``) for the RoPE table the decode was last given. Its tensors
    other than the params' own are what :mod:`~vllm_seqkv.integration.fixed_memory` counts for
    the C++ ops (the RoPE table is only referenced weakly: it is counted as the layer's)."""

    def __init__(self, params: TransformLayerParams):
        self.k_tables, self.v_tables = stream_tables(params.key), stream_tables(params.value)
        self.k_format, self.v_format = stream_format(params.key), stream_format(params.value)
        self.pairs = pair_blocks(params.key.inverse)
        self._tables: torch.Tensor | None = None
        self._rope: weakref.ref | None = None  # the rope _tables were built for (None: none)

    def layer_tables(self, pages: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
        """The decode's layer tables for ``rope`` (None: keys without RoPE), built at the first
        call with it. NOTE: the op checks at every call that they were built from this call's
        very tensors (same data pointers)."""
        same = (self._rope is None) if rope is None else (self._rope is not None and self._rope() is rope)
        if self._tables is None or not same:
            self._tables = torch.ops.seqkv.cpu_transform_layer_tables(
                pages, self.k_tables, self.v_tables, self.k_format, self.v_format, self.pairs, rope)
            # NOTE: one set per layer (the engine gives a layer one RoPE table)
            self._rope = None if rope is None else weakref.ref(rope)
        return self._tables

    def any_tables(self, pages: torch.Tensor) -> torch.Tensor:
        """Layer tables for the write and the reconstruction (which read the streams only):
        the decode's when built, else rope-less ones (replaced by the decode's later)."""
        return self._tables if self._tables is not None else self.layer_tables(pages, None)


def layer_args(params: TransformLayerParams) -> _LayerArgs:
    """The :class:`_LayerArgs` of ``params``, kept with them (``params.derived``)."""
    args = params.derived.get("cpu_ops")
    if args is None:
        args = params.derived["cpu_ops"] = _LayerArgs(params)
    return args


def key_pairs(params: TransformLayerParams) -> torch.Tensor | None:
    """:func:`pair_blocks` of the key inverse, computed once per params object."""
    return layer_args(params).pairs


def _check_common(pages: torch.Tensor, params: TransformLayerParams, what: str) -> None:
    _check_params(params, what)
    check_pages(pages, params)
    expect(pages.device.type == "cpu", f"{what}: the C++ CPU ops take CPU tensors, pages are on {pages.device}")
    expect(pages.stride(3) == 1, f"pages: last dimension must be contiguous, strides {pages.stride()}")


def _check_params(params, what: str) -> None:
    expect(isinstance(params, TransformLayerParams), f"{what}: transform-format params expected, got "
           f"{type(params).__name__}")
    expect(not params.cross_layer, f"{what}: the C++ CPU ops read layers without cross-layer prediction; "
           "cross-layer presets use the torch path")


def _checked_args(params: TransformLayerParams, what: str) -> _LayerArgs:
    """The layer's :class:`_LayerArgs` after the checks of ``params`` (the op checks the pages)."""
    _check_params(params, what)
    return layer_args(params)


def _check_write_inputs(key, value, slot_mapping, pages, params: TransformLayerParams) -> int:
    """key/value ``[T, H, D]`` float, slot_mapping int ``[T]``, all on the pages' device; returns T."""
    heads, dim = params.num_kv_heads, params.head_dim
    check_tensor("key", key, (None, heads, dim), FLOAT_DTYPES, pages.device)
    tokens = key.shape[0]
    check_tensor("value", value, (tokens, heads, dim), FLOAT_DTYPES, pages.device)
    check_tensor("slot_mapping", slot_mapping, (tokens,), INDEX_DTYPES, pages.device)
    return tokens


def _check_rope(rope, rows: int, dim: int, device) -> None:
    check_tensor("rope", rope, (None, dim), (torch.float32,), device)
    expect(rope.is_contiguous(), "rope: must be contiguous")
    expect(rope.shape[0] >= rows, f"rope: {rope.shape[0]} rows, positions up to {rows - 1} are read")


def _check_decode_arguments(query, own_k, own_v, pages, block_table, seq_lens, params, rope, skip_first,
                            sinks) -> None:
    """The decode's arguments, checked here to name the wrong one (:class:`KernelArgumentError`)."""
    _check_common(pages, params, "decode attention")
    device, heads, dim = pages.device, params.num_kv_heads, params.head_dim
    check_decode_inputs(query, own_k, own_v, block_table, seq_lens, rope, skip_first, heads, dim, device)
    batch = query.shape[0]
    if batch and rope is not None:
        _check_rope(rope, int(seq_lens.max()) - 1, dim, device)
    if sinks is not None:
        sink_k, sink_v = sinks
        check_tensor("sink_k", sink_k, (batch, None, heads, dim), FLOAT_DTYPES, device)
        check_tensor("sink_v", sink_v, tuple(sink_k.shape), FLOAT_DTYPES, device)
        expect(sink_k.shape[1] <= skip_first, f"sinks: {sink_k.shape[1]} exact rows but skip_first {skip_first}: "
               "the pages' rows of those positions would count too")


def transform_decode_attention_cpp(query, own_k, own_v, pages, block_table, seq_lens,
                                   params: TransformLayerParams, scale: float, rope=None, previous=None,
                                   num_splits: int | None = None, skip_first: int = 0,
                                   return_lse: bool = False, sinks=None):
    """query ``[B, Hq, D]`` (post-RoPE), own_k/own_v ``[B, H, D]`` (exact K/V of position
    ``seq_lens - 1``; both None: no own token, positions ``< seq_lens - 1`` only), pages uint8
    ``[N, H, bs, S]``, block_table int ``[B, max_blocks]``, seq_lens int ``[B]`` (>= 1) ->
    ``[B, Hq, D]`` in the query's dtype (float32 math); with
    ``return_lse`` also the log of each softmax denominator float32 ``[B, Hq]``. ``rope``: a
    ``rope_cache`` table for pre-RoPE keys; ``skip_first``: cached positions not read;
    ``num_splits``: context chunks per sequence (default: enough work items for every thread);
    ``sinks``: ``(sink_k, sink_v)`` float ``[B, S, H, D]``, the exact rows of positions ``0 .. S - 1``
    (``S <= skip_first``), merged in by the op (``lse`` then covers them too)."""
    _require_ops()
    args = _checked_args(params, "decode attention")
    expect(previous is None, "previous: the C++ CPU decode reads layers without cross-layer prediction")
    sink_k, sink_v = sinks if sinks is not None else (None, None)
    try:
        out, lse = torch.ops.seqkv.cpu_transform_decode_attention(
            query, own_k, own_v, pages, block_table, seq_lens, rope, args.k_tables, args.v_tables, args.k_format,
            args.v_format, args.pairs, float(scale), int(num_splits or 0), int(skip_first), sink_k, sink_v,
            args.layer_tables(pages, rope))
    except RuntimeError:  # the op checks every argument; say which one, where this side can
        _check_decode_arguments(query, own_k, own_v, pages, block_table, seq_lens, params, rope, skip_first, sinks)
        raise
    return (out, lse) if return_lse else out


def write_transform_slots_cpp(key, value, slot_mapping, pages, params: TransformLayerParams,
                              previous=None) -> None:
    """key (coding frame) / value ``[T, H, D]``, slot_mapping int ``[T]`` (-1 = skip), pages
    written in place with the bytes the codec's encode gives."""
    _require_ops()
    _check_common(pages, params, "write")
    expect(previous is None, "previous: the C++ CPU write codes layers without cross-layer prediction")
    _check_write_inputs(key, value, slot_mapping, pages, params)
    valid = slot_mapping >= 0
    if not bool(valid.all()):  # as the reference: the codec codes the valid tokens only
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    if key.shape[0] == 0:
        return
    k, v = params.key, params.value
    # NOTE: the codec's own expression (TransformCodec.encode), so codes at a decision
    # threshold come out exactly as the codec's
    zk = torch.einsum("thd,hde->the", key.float() - k.mean, k.basis)
    zv = torch.einsum("thd,hde->the", value.float() - v.mean, v.basis)
    args = layer_args(params)
    torch.ops.seqkv.cpu_write_transform_slots(zk, zv, slot_mapping, pages, args.k_tables, args.v_tables,
                                              args.k_format, args.v_format, args.any_tables(pages))


def write_transform_tokens_cpp(key, value, slot_mapping, positions, pages, params: TransformLayerParams,
                               rope=None) -> torch.Tensor:
    """The engine's write in one op: key (post-RoPE) / value ``[T, H, D]`` as the model gave them,
    slot_mapping int ``[T]`` (-1 = skip), positions int ``[T]``, ``rope``: the layer's RoPE table
    ``[P, D]`` as the model applies it (magnitude included; keys are un-rotated by its exact
    inverse) or None for post-RoPE presets. NaN/inf elements are stored as 0. Returns an int64
    scalar tensor: how many written tokens had NaN/inf in K or V (``.item()``: no kernel launch).
    The bytes equal the codec's encode of the un-rotated keys except where a component ``z`` lies
    within float32 rounding of a decision threshold: the op computes ``z = (x - mean) @ basis``
    with its own multiply-adds (a BLAS call cost more than the rest of a one-token write), not
    the codec's einsum, so such a code may come out one level away (equally close to ``z``; the
    GPU writes have the same contract, ``tests/kernels/test_transform_kernels.py::check_flips``).
    :func:`write_transform_slots_cpp` keeps exact bytes."""
    _require_ops()
    args = _checked_args(params, "write")
    try:
        return torch.ops.seqkv.cpu_write_transform_tokens(key, value, slot_mapping, positions, pages, rope,
                                                          args.k_tables, args.v_tables, args.k_format,
                                                          args.v_format, args.any_tables(pages))
    except RuntimeError:  # the op checks every argument; say which one, where this side can
        _check_common(pages, params, "write")
        tokens = _check_write_inputs(key, value, slot_mapping, pages, params)
        check_tensor("positions", positions, (tokens,), INDEX_DTYPES, pages.device)
        if rope is not None:
            check_tensor("rope", rope, (None, params.head_dim), (torch.float32,), pages.device)
            expect(rope.is_contiguous(), "rope: must be contiguous")
        raise


class DecodeStepOps:
    """One layer's two calls of a decode step on CPU, the write of the step's new tokens and the
    fused decode, with what does not change between steps bound once: the pages, the stream
    tables and formats, the key pair blocks, the layer tables and both RoPE tables (``write_rope``:
    the model's table, ``rope``: its pure rotations; None for post-RoPE presets). The ops are
    called straight, without the checks and dispatch of :func:`write_transform_tokens_cpp` and
    :func:`transform_decode_attention_cpp`: the ops check every argument themselves, and a call
    they refuse is rerun through those wrappers to name the argument. Results are the
    wrappers' (same op, same arguments)."""

    def __init__(self, params: TransformLayerParams, pages: torch.Tensor, write_rope: torch.Tensor | None,
                 rope: torch.Tensor | None):
        _require_ops()
        args = _checked_args(params, "decode step")
        self.params, self.pages, self.write_rope, self.rope = params, pages, write_rope, rope
        self._tables = (args.k_tables, args.v_tables, args.k_format, args.v_format)
        self._pairs = args.pairs
        self._layer_tables = args.layer_tables(pages, rope)

    def write_tokens(self, key, value, slot_mapping, positions) -> torch.Tensor:
        """:func:`write_transform_tokens_cpp` on the bound pages and RoPE table."""
        try:
            return torch.ops.seqkv.cpu_write_transform_tokens(key, value, slot_mapping, positions, self.pages,
                                                              self.write_rope, *self._tables, self._layer_tables)
        except RuntimeError:
            write_transform_tokens_cpp(key, value, slot_mapping, positions, self.pages, self.params, self.write_rope)
            raise

    def decode(self, query, own_k, own_v, block_table, seq_lens, scale: float, skip_first: int = 0, sinks=None):
        """:func:`transform_decode_attention_cpp` with ``return_lse`` on the bound pages and
        rotations -> ``(out [B, Hq, D] in the query's dtype, lse [B, Hq])``."""
        sink_k, sink_v = sinks if sinks is not None else (None, None)
        try:
            return torch.ops.seqkv.cpu_transform_decode_attention(
                query, own_k, own_v, self.pages, block_table, seq_lens, self.rope, *self._tables, self._pairs,
                float(scale), 0, int(skip_first), sink_k, sink_v, self._layer_tables)
        except RuntimeError:
            transform_decode_attention_cpp(query, own_k, own_v, self.pages, block_table, seq_lens, self.params,
                                           scale, rope=self.rope, skip_first=skip_first, sinks=sinks)
            raise


def reconstruct_transform_blocks_cpp(pages, block_ids, params: TransformLayerParams, previous=None,
                                     rope=None, block_positions=None):
    """``block_ids`` int ``[M]`` (-1: zero rows) -> K, V float32 ``[M * bs, H, D]`` in slot order;
    with ``rope`` keys are rotated at ``block_positions[m] + slot``."""
    _require_ops()
    _check_common(pages, params, "reconstruct")
    expect(previous is None, "previous: the C++ CPU reconstruction reads layers without cross-layer prediction")
    check_tensor("block_ids", block_ids, (None,), INDEX_DTYPES, pages.device)
    if rope is not None:
        expect(block_positions is not None, "rope needs block_positions (position of each block's first slot)")
        check_tensor("block_positions", block_positions, (block_ids.shape[0],), INDEX_DTYPES, pages.device)
        valid = block_ids >= 0
        rows = int((block_positions[valid].max() + pages.shape[2])) if bool(valid.any()) else 0
        _check_rope(rope, rows, params.head_dim, pages.device)
    args = layer_args(params)
    return torch.ops.seqkv.cpu_reconstruct_transform_blocks(
        pages, block_ids, rope, block_positions if rope is not None else None, args.k_tables, args.v_tables,
        args.k_format, args.v_format, args.pairs, args.any_tables(pages))


__all__ = ["DecodeStepOps", "KernelArgumentError", "active_isa", "key_pairs", "load_cpu_ops", "load_error",
           "pair_blocks", "reconstruct_transform_blocks_cpp", "transform_decode_attention_cpp",
           "write_transform_slots_cpp", "write_transform_tokens_cpp"]
