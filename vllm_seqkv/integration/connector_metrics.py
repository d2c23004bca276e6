"""The cold tier's figures in vLLM's Prometheus ``/metrics``, through vLLM's connector-stats API.

The worker hands vLLM a :class:`ColdTierStats` per step (counter increments since the last
one, gauge snapshots), and the scheduler side its own counters (approximate reuse); vLLM
ships it to the front-end process, aggregates it (counters summed,
gauges: the latest) and records it with :class:`ColdTierPromMetrics`:

* ``vllm:seqkv_cold_tier_saved_blocks_total``, ``..._save_failures_total``,
  ``..._saves_dropped_total`` (the save queue was full), ``..._restored_blocks_total``,
  ``..._load_failures_total`` (missing or corrupt: recomputed),
  ``..._approximate_requests_total`` and ``..._approximate_blocks_total`` (requests served
  a near-duplicate prefix, and its blocks: approximate reuse);
* ``vllm:seqkv_cold_tier_bytes``, ``..._blocks`` (held by the tier),
  ``..._pending_save_bytes`` (copies waiting for the background saver).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm_seqkv.integration.compat import KVConnectorPromMetrics, KVConnectorStats

PREFIX = "vllm:seqkv_cold_tier_"
COUNTERS = {  # connector stats key -> (metric name, help)
    "saved_blocks": ("saved_blocks", "Blocks stored in the cold tier"),
    "save_failures": ("save_failures", "Blocks the cold tier could not store"),
    "saves_dropped": ("saves_dropped", "Saves dropped because save_queue_bytes was reached"),
    "loaded_blocks": ("restored_blocks", "Blocks restored from the cold tier into vLLM's pages"),
    "load_failures": ("load_failures", "Loads that found a missing or corrupt blob (recomputed)"),
    "approx_requests": ("approximate_requests", "Requests served blocks of a near-duplicate "
                        "prefix (approximate reuse)"),
    "approx_blocks": ("approximate_blocks", "Blocks of near-duplicate prefixes loaded for "
                      "approximate reuse"),
}
GAUGES = {
    "tier_bytes": ("bytes", "Bytes of coded blocks the cold tier holds"),
    "tier_blocks": ("blocks", "Blocks the cold tier holds"),
    "pending_save_bytes": ("pending_save_bytes", "Block copies waiting for the background saver"),
}


@dataclass
class ColdTierStats(KVConnectorStats):
    """``data``: counter increments and gauge snapshots by connector stats key."""

    def reset(self):
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for key, value in other.data.items():
            self.data[key] = self.data.get(key, 0) + value if key in COUNTERS else value
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not self.data


class StatsDelta:
    """Counter increments since the previous :meth:`take` (the worker keeps running totals)."""

    def __init__(self):
        self._reported: dict[str, float] = {}

    def take(self, totals: dict[str, Any], gauges: dict[str, float]) -> ColdTierStats:
        data: dict[str, float] = {}
        for key in COUNTERS:
            delta = totals.get(key, 0) - self._reported.get(key, 0)
            if delta:
                data[key] = delta
                self._reported[key] = totals.get(key, 0)
        data.update(gauges)
        return ColdTierStats(data=data)


class ColdTierPromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._metrics = {}
        for key, (name, doc) in COUNTERS.items():
            self._metrics[key] = self._counter_cls(name=f"{PREFIX}{name}_total", documentation=doc,
                                                   labelnames=self._labelnames)
        for key, (name, doc) in GAUGES.items():
            self._metrics[key] = self._gauge_cls(name=f"{PREFIX}{name}", documentation=doc,
                                                 labelnames=self._labelnames,
                                                 multiprocess_mode="mostrecent")

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0):
        labels = self.per_engine_labelvalues[engine_idx]
        for key, value in transfer_stats_data.items():
            metric = self._metrics.get(key)
            if metric is None:
                continue
            if key in COUNTERS:
                metric.labels(*labels).inc(value)
            else:
                metric.labels(*labels).set(value)
