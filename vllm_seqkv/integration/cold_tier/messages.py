"""What the scheduler side and the worker side of the cold tier send each other each step."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm_seqkv.integration.compat import KVConnectorMetadata, KVConnectorWorkerMetadata


@dataclass
class BlockJob:
    req_id: str
    block_ids: list[int]
    keys: list[bytes]
    first_token: int = 0  # token index of the first block (for log lines)
    starts: list[bool] = field(default_factory=list)  # saves: block i is the request's first


@dataclass
class LoadResult:
    """What the loader thread did for one load job: the pages of its first ``done`` blocks
    are in place (``sinks[i]``: block i's parsed sink rows, installed by the engine thread);
    ``failed``: the index of the block that could not be loaded (the job stopped there);
    ``cancelled``: the request finished meanwhile and the rest was skipped."""

    done: int = 0
    sinks: list[dict] = field(default_factory=list)
    failed: int | None = None
    cancelled: bool = False
    seconds: float = 0.0


@dataclass
class ColdTierMetadata(KVConnectorMetadata):
    saves: list[BlockJob] = field(default_factory=list)
    loads: list[BlockJob] = field(default_factory=list)
    accesses: list[list[bytes]] = field(default_factory=list)  # finished requests' key chains


@dataclass
class ColdTierWorkerMetadata(KVConnectorWorkerMetadata):
    """Keys whose state changed this step: bytes held, or None (not held any more); keys
    whose load failed (the scheduler does not offer them for a while)."""

    held: dict[bytes, int | None] = field(default_factory=dict)
    failed: set[bytes] = field(default_factory=set)

    def aggregate(self, other: "ColdTierWorkerMetadata") -> "ColdTierWorkerMetadata":
        return ColdTierWorkerMetadata({**self.held, **other.held}, self.failed | other.failed)


