"""Prometheus gauges next to vLLM's own (``/metrics`` of ``vllm serve``).

Registered in the front-end process, which serves ``/metrics``; values are read at scrape
time from the engine config (vLLM copies the engine's block count back into it). The fixed
memory gauges are computed in the front-end by the same function the worker sizes the pages
with (:func:`~.fixed_memory.fixed_memory_of`), from the same codec and config.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import REGISTRY, Gauge


def slot_bits_per_element(slot_bytes: int, head_dim: int) -> float:
    """A slot codes one token-head's K and V: ``2 * head_dim`` elements."""
    return 8 * slot_bytes / (2 * head_dim)


def slot_ratio_vs_bf16(slot_bytes: int, head_dim: int) -> float:
    return 16 / slot_bits_per_element(slot_bytes, head_dim)


@dataclass(frozen=True)
class CacheFigures:
    """Static figures of the active preset for this model."""

    preset: str
    slot_bytes: int
    head_dim: int
    num_kv_heads: int
    num_layers: int

    @property
    def bits_per_element(self) -> float:
        return slot_bits_per_element(self.slot_bytes, self.head_dim)

    @property
    def ratio_vs_bf16(self) -> float:
        return slot_ratio_vs_bf16(self.slot_bytes, self.head_dim)

    def bytes_per_token(self) -> int:
        return self.slot_bytes * self.num_kv_heads * self.num_layers


_GAUGES = {
    "seqkv_bits_per_element": "All-in bits per cached K/V element of the seqkv pages",
    "seqkv_compression_ratio": "Bytes of a bf16 KV cache per byte of the seqkv cache",
    "seqkv_kv_cache_tokens": "KV tokens the seqkv cache holds (vLLM blocks x block size)",
    "seqkv_kv_cache_bytes": "Bytes of compressed KV pages allocated by the engine",
}
_registered: dict[str, Gauge] = {}


def export(figures: CacheFigures, cache_config) -> None:
    def tokens() -> float:
        return float((cache_config.num_gpu_blocks or 0) * cache_config.block_size)

    values = {
        "seqkv_bits_per_element": lambda: figures.bits_per_element,
        "seqkv_compression_ratio": lambda: figures.ratio_vs_bf16,
        "seqkv_kv_cache_tokens": tokens,
        "seqkv_kv_cache_bytes": lambda: tokens() * figures.bytes_per_token(),
    }
    for name, doc in _GAUGES.items():
        if name not in _registered:
            _registered[name] = Gauge(name, doc, ["preset"], registry=REGISTRY)
        _registered[name].labels(preset=figures.preset).set_function(values[name])


_FIXED_GAUGES = {
    "seqkv_fixed_bytes": "Bytes seqkv holds outside the KV pages, by part (sink_table: its "
                         "bound at the engine's block count; scratch: a bound on per-step buffers)",
    "seqkv_fixed_bytes_taken_from_kv_budget": "Bytes of vLLM's KV budget kept for seqkv's fixed "
                                              "memory instead of pages",
}


def export_fixed_memory(fixed, preset: str, cache_config, whole_budget: bool, kv_on_host: bool) -> None:
    """Gauges of a :class:`~.fixed_memory.FixedMemory`: ``seqkv_fixed_bytes{preset, part}``
    (every part of :data:`~.fixed_memory.PARTS`) and ``seqkv_fixed_bytes_taken_from_kv_budget
    {preset}``, read at scrape time at the engine's block count."""
    from vllm_seqkv.integration.fixed_memory import PARTS

    def blocks() -> int:
        return cache_config.num_gpu_blocks or 0

    for name, doc in _FIXED_GAUGES.items():
        if name not in _registered:
            labels = ["preset", "part"] if name == "seqkv_fixed_bytes" else ["preset"]
            _registered[name] = Gauge(name, doc, labels, registry=REGISTRY)
    for part in PARTS:
        _registered["seqkv_fixed_bytes"].labels(preset=preset, part=part).set_function(
            lambda part=part: float(fixed.parts(blocks())[part]))
    _registered["seqkv_fixed_bytes_taken_from_kv_budget"].labels(preset=preset).set_function(
        lambda: float(fixed.taken(blocks(), whole_budget, kv_on_host)))
