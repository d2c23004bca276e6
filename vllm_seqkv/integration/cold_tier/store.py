"""A block's record in a cold tier, copied to and from vLLM's pages."""

from __future__ import annotations

import logging
import struct
import threading
import time

import numpy as np
import torch

logger = logging.getLogger("vllm.seqkv.connector")

_SINK_HEAD = struct.Struct("<HH")  # layer, offset


class BlockStore:
    """Copies whole blocks between vLLM's pages and a tier.

    ``pages``: one uint8 tensor ``[num_blocks, H, block_size, slot_bytes]`` per layer, in
    layer order. A block's record: the page bytes laid out ``[layer, token, head, slot]``
    (rows of ``H x slot_bytes`` bytes, the layout ``ColdCodec`` models per column), then the
    exact sink rows of a sequence's first block (``u32 count``, then per entry ``u16 layer,
    u16 offset, K, V`` as float32 ``[H, D]``; count 0 for other blocks).

    NOTE: every tier call holds ``lock`` (a background saver and loader share the tier),
    except the pure ``encode_block`` / ``decode_block``.
    """

    def __init__(self, tier, pages: list[torch.Tensor], sinks=None, head_dim: int | None = None):
        self.tier = tier
        self.lock = threading.Lock()
        self.pages = pages
        self.sinks = sinks
        self.head_dim = head_dim
        _, self.heads, self.block_size, self.slot_bytes = pages[0].shape
        self.page_bytes = len(pages) * self.heads * self.block_size * self.slot_bytes

    @staticmethod
    def codec_for(layers: int, heads: int, block_size: int, slot_bytes: int, entropy: bool = True,
                  head=None):
        """Raw bytes, or the page bytes through ``head`` (default: the byte-level
        ``ColdCodec``) and the sink rows raw."""
        from vllm_seqkv.tiers.coders import ColdCodec, RawCodec, SplitCodec

        if not entropy:
            return RawCodec()
        return SplitCodec(head or ColdCodec(columns=heads * slot_bytes),
                          layers * heads * block_size * slot_bytes)

    # -- record <-> pages --
    def read(self, block: int, starts_sequence: bool = True) -> bytes:
        """The block's record; its exact sink rows only when it is a sequence's first block."""
        stacked = torch.stack([p[block] for p in self.pages]).cpu()  # [L, H, bs, S]
        out = stacked.permute(0, 2, 1, 3).contiguous().numpy().tobytes()
        return out + self._export_sinks(block if starts_sequence else None)

    def write_pages(self, block: int, record: bytes) -> dict[int, dict]:
        """Copy the record's page bytes into ``block`` and return its parsed sink rows (for
        :meth:`install_sinks`). Parses first: a record that does not fit changes nothing.
        Touches no sink table, so a background loader may call it."""
        if len(record) < self.page_bytes:
            raise ValueError(f"record of {len(record)} bytes < {self.page_bytes} page bytes")
        L, H, bs, S = len(self.pages), self.heads, self.block_size, self.slot_bytes
        arr = np.frombuffer(record, np.uint8, count=self.page_bytes).reshape(L, bs, H, S)
        sinks = self._parse_sinks(record[self.page_bytes:])  # parse first: all or nothing
        for layer, p in enumerate(self.pages):
            p[block].copy_(torch.from_numpy(arr[layer].transpose(1, 0, 2).copy()))
        return sinks

    def install_sinks(self, block: int, sinks: dict[int, dict]) -> None:
        """Install ``block``'s sink rows (``write_pages`` gave them) once its pages are in
        place. NOTE: the sink table is not thread-safe: the engine thread only."""
        if self.sinks is not None:
            for layer in range(len(self.pages)):
                self.sinks.import_(layer, block, sinks.get(layer, {}))

    def _export_sinks(self, block: int | None) -> bytes:
        if self.sinks is None or block is None:
            return struct.pack("<I", 0)
        parts, count = [], 0
        for layer in range(len(self.pages)):
            for offset, (k, v) in sorted(self.sinks.export(layer, block).items()):
                parts.append(_SINK_HEAD.pack(layer, offset) + k.float().cpu().contiguous().numpy().tobytes()
                             + v.float().cpu().contiguous().numpy().tobytes())
                count += 1
        return struct.pack("<I", count) + b"".join(parts)

    def _parse_sinks(self, tail: bytes) -> dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
        if len(tail) < 4:
            raise ValueError("record has no sink section")
        (count,) = struct.unpack_from("<I", tail)
        out: dict[int, dict] = {}
        if count == 0:
            return out
        if self.head_dim is None:
            raise ValueError("record carries sink rows but the head size is unknown")
        n = self.heads * self.head_dim
        size = _SINK_HEAD.size + 8 * n
        if len(tail) != 4 + count * size:
            raise ValueError("sink section length mismatch")
        for i in range(count):
            at = 4 + i * size
            layer, offset = _SINK_HEAD.unpack_from(tail, at)
            vals = np.frombuffer(tail, np.float32, count=2 * n, offset=at + _SINK_HEAD.size)
            k = torch.from_numpy(vals[:n].copy()).view(self.heads, self.head_dim)
            v = torch.from_numpy(vals[n:].copy()).view(self.heads, self.head_dim)
            out.setdefault(layer, {})[offset] = (k, v)
        return out

    # -- tier --
    def save(self, key: bytes, block: int) -> bool:
        record = self.read(block)
        with self.lock:
            return self.tier.save(key, record)

    def load_pages(self, key: bytes, block: int) -> dict[int, dict] | None:
        """Decode ``key``'s blob and copy its page bytes into ``block``: the block's sink rows
        (to :meth:`install_sinks`), or None when it is missing, corrupt or does not fit (then
        the pages keep what they held). Touches no sink table: a background loader calls it."""
        t0 = time.perf_counter()
        with self.lock:
            blob = self.tier.fetch(key)
        record = self.tier.decode_block(key, blob)  # the slow part: the tier is free meanwhile
        with self.lock:
            self.tier.finish_load(key, blob, record, time.perf_counter() - t0)
        if record is None:
            return None
        try:
            return self.write_pages(block, record)
        except Exception as e:  # a verified blob of another shape: refuse, recompute
            logger.warning("seqkv cold tier: block %s does not fit the pages (%s); "
                           "recomputing", key.hex()[:16], e)
            with self.lock:
                self.tier.delete(key)
            return None

    def load(self, key: bytes, block: int) -> bool:
        """Pages and sink rows of ``key`` into ``block`` on the calling thread."""
        sinks = self.load_pages(key, block)
        if sinks is None:
            return False
        self.install_sinks(block, sinks)
        return True
