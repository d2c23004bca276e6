"""A tier's counters, for the connector's ``/metrics`` (as ``tier_<name>``) and the benchmarks."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class TierStats:
    """``loads`` = hits + misses; ``errors``: backend failures, refused encodes and corrupt
    blobs (each warned); ``load_s`` / ``save_s``: seconds inside the tier's load and store."""

    saves: int = 0
    loads: int = 0
    hits: int = 0
    misses: int = 0
    errors: int = 0
    evictions: int = 0
    load_s: float = 0.0
    save_s: float = 0.0

    def as_dict(self) -> dict[str, int | float]:
        return dataclasses.asdict(self)
