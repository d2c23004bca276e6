"""Pure-torch references: the codec's own code (SlotLayout) plus torch SDPA, run on CPU.

These are what the kernels are tested against and what runs when no GPU is present. They
are the backend's algorithm (``vllm_seqkv.integration.backend``) without its vLLM imports:
decode attention of one query equals ``attend`` with the cache's last position replaced by
the exact own K/V (tests check this against ``attend`` where vLLM is installed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_seqkv.codec.base import SlotLayout


def write_slots_reference(key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor,
                          pages: torch.Tensor, layout: SlotLayout) -> None:
    """Code ``key``/``value`` ``[T, H, D]`` into ``pages[slot // bs, :, slot % bs]`` (slot -1 = skip)."""
    valid = slot_mapping >= 0
    if not bool(valid.any()):
        return
    slots = slot_mapping[valid].long()
    coded = layout.encode(key[valid].float().cpu(), value[valid].float().cpu())
    block_size = pages.shape[2]
    pages[slots // block_size, :, slots % block_size] = coded.to(pages.device)


def reconstruct_blocks_reference(pages: torch.Tensor, block_ids: torch.Tensor,
                                 layout: SlotLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode whole pages: ``block_ids [M]`` -> K, V float32 ``[M * bs, H, D]`` in token order."""
    heads, slot_bytes = pages.shape[1], pages.shape[3]
    slots = pages[block_ids.long()].transpose(1, 2).reshape(-1, heads, slot_bytes)
    key, value = layout.decode(slots.cpu())
    return key.to(pages.device), value.to(pages.device)


def paged_decode_attention_reference(query: torch.Tensor, own_k: torch.Tensor, own_v: torch.Tensor,
                                     pages: torch.Tensor, block_table: torch.Tensor,
                                     seq_lens: torch.Tensor, layout: SlotLayout,
                                     scale: float) -> torch.Tensor:
    """query ``[B, Hq, D]``, own_k/v ``[B, H, D]`` -> ``[B, Hq, D]`` (query's dtype).

    Sequence ``i`` attends to its decoded cache positions ``[0, seq_lens[i] - 1)`` and to
    its exact own K/V at position ``seq_lens[i] - 1``.
    """
    block_size = pages.shape[2]
    out = torch.empty_like(query)
    for i, seq_len in enumerate(seq_lens.tolist()):
        blocks = block_table[i, : -(-seq_len // block_size)]
        key, value = reconstruct_blocks_reference(pages, blocks, layout)
        key = torch.cat([key[: seq_len - 1], own_k[i : i + 1].float()])  # [L, H, D]
        value = torch.cat([value[: seq_len - 1], own_v[i : i + 1].float()])
        attended = F.scaled_dot_product_attention(
            query[i].float()[:, None], key.transpose(0, 1), value.transpose(0, 1),
            scale=scale, enable_gqa=True)  # [Hq, 1, D]
        out[i] = attended[:, 0].to(query.dtype)
    return out


def rope_from_table(key: torch.Tensor, rope: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """:func:`vllm_seqkv.codec.rope.apply_rope` with cos/sin read from a
    :func:`~vllm_seqkv.kernels.params.rope_cache` table (same values as rope_tables)."""
    from vllm_seqkv.codec.rope import apply_rope

    half = rope.shape[1] // 2
    rows = rope.cpu()[positions.long().cpu()]
    cos, sin = rows[:, :half], rows[:, half:]
    return apply_rope(key, torch.cat([cos, cos], -1), torch.cat([sin, sin], -1))


def reconstruct_transform_reference(pages: torch.Tensor, block_ids: torch.Tensor, layout: SlotLayout,
                                    previous=None, rope: torch.Tensor | None = None,
                                    block_positions: torch.Tensor | None = None,
                                    keep_code_frame: bool = False):
    """The codec's own decode of whole pages of a transform layer: ``block_ids [M]`` (-1: zeros)
    -> K, V float32 ``[M * bs, H, D]``; ``previous``: the layer below's reconstruction of the
    same rows (coding frame); with ``rope`` (a ``rope_cache`` table) keys are RoPE-rotated at
    ``block_positions[m] + slot`` (and ``keep_code_frame`` also returns the pre-RoPE keys)."""
    heads, block_size, slot_bytes = pages.shape[1], pages.shape[2], pages.shape[3]
    ids = block_ids.long().cpu()
    valid = (ids >= 0).repeat_interleave(block_size)
    slots = pages.cpu()[ids.clamp(min=0)].transpose(1, 2).reshape(-1, heads, slot_bytes)
    if previous is not None:
        previous = tuple(p.float().cpu() for p in previous)
    key, value = layout.decode(slots, previous)
    key[~valid] = 0
    value[~valid] = 0
    out = [key, value]
    if rope is not None:
        positions = (block_positions.long().cpu()[:, None] + torch.arange(block_size)).reshape(-1)
        out[0] = rope_from_table(key, rope, positions) * valid[:, None, None]
        if keep_code_frame:
            out.append(key)
    return tuple(t.to(pages.device) for t in out)


def transform_decode_attention_reference(query: torch.Tensor, own_k: torch.Tensor, own_v: torch.Tensor,
                                         pages: torch.Tensor, block_table: torch.Tensor,
                                         seq_lens: torch.Tensor, layout: SlotLayout, scale: float,
                                         rope: torch.Tensor | None = None, previous=None,
                                         skip_first: int = 0, return_lse: bool = False):
    """Per sequence: the codec's decode of positions ``[skip_first, seq_len - 1)`` (keys
    RoPE-rotated when ``rope`` is given) + exact own K/V at ``seq_len - 1`` (none when own_k is
    None), then softmax
    attention in float32; with ``return_lse`` also the log of each softmax denominator
    ``[B, Hq]``. ``previous``: the layer below's coding-frame reconstruction
    ``[B, max_blocks * bs, H, D]``."""
    block_size = pages.shape[2]
    out = torch.empty_like(query)
    lse = torch.empty(query.shape[:2], dtype=torch.float32, device=query.device)
    for i, seq_len in enumerate(seq_lens.tolist()):
        stored = seq_len if own_k is not None else seq_len - 1  # no own token: its position is not in the table
        count = -(-stored // block_size)
        blocks = block_table[i, :count]
        prev = None if previous is None else tuple(p[i, : count * block_size] for p in previous)
        positions = torch.arange(count) * block_size
        key, value = reconstruct_transform_reference(pages, blocks, layout, prev, rope, positions)[:2]
        first = min(skip_first, seq_len - 1)
        key, value = key[first: seq_len - 1].cpu(), value[first: seq_len - 1].cpu()
        if own_k is not None:  # None: no own token (a shared prefix's pass)
            key = torch.cat([key, own_k[i : i + 1].float().cpu()])
            value = torch.cat([value, own_v[i : i + 1].float().cpu()])
        group = query.shape[1] // key.shape[1]
        scores = torch.einsum("hd,shd->hs", query[i].float().cpu(),
                              key.repeat_interleave(group, dim=1)) * scale  # [Hq, S]
        attended = torch.einsum("hs,shd->hd", scores.softmax(-1), value.repeat_interleave(group, dim=1))
        out[i] = attended.to(query.dtype)
        lse[i] = scores.logsumexp(-1)
    return (out, lse) if return_lse else out


def write_transform_reference(key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor,
                              pages: torch.Tensor, layout: SlotLayout, previous=None) -> None:
    """:func:`write_slots_reference` with ``previous`` (the layer below's reconstruction of the
    same tokens, coding frame) for cross-layer layers; keys in the coding frame (pre-RoPE)."""
    valid = (slot_mapping >= 0).cpu()
    if not bool(valid.any()):
        return
    slots = slot_mapping.cpu()[valid].long()
    if previous is not None:
        previous = tuple(p.float().cpu()[valid] for p in previous)
    coded = layout.encode(key.cpu()[valid].float(), value.cpu()[valid].float(), previous)
    block_size = pages.shape[2]
    pages[slots // block_size, :, slots % block_size] = coded.to(pages.device)


def merge_sink_rows(out: torch.Tensor, lse: torch.Tensor, query: torch.Tensor, sink_k: torch.Tensor,
                    sink_v: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """A decode over the pages that skipped positions ``0 .. S - 1`` (``out [B, Hq, D]``, its
    ``lse [B, Hq]``) merged with those positions' exact rows ``sink_k/sink_v [B, S, H, D]`` by
    the log-sum-exp: row ``s`` counts where ``s < seq_len - 1`` (a cached position). Returns
    float32 ``[B, Hq, D]``. What the C++ decode does inside the op (its ``sinks`` argument)."""
    group = query.shape[1] // sink_k.shape[2]
    scores = torch.einsum("bhd,bshd->bhs", query.float(), sink_k.float().repeat_interleave(group, dim=2)) * scale
    sinks = sink_k.shape[1]
    cached = torch.arange(sinks, device=query.device)[None, :] < (seq_lens.long() - 1)[:, None]  # [B, S]
    scores = scores.masked_fill(~cached[:, None, :], float("-inf"))
    sink_lse = scores.logsumexp(-1)  # [B, Hq]; -inf where a sequence has no cached sink
    sink_out = torch.einsum("bhs,bshd->bhd", scores.softmax(-1).nan_to_num(0.0),
                            sink_v.float().repeat_interleave(group, dim=2))
    weights = torch.stack([lse, sink_lse]).softmax(0)  # [2, B, Hq]
    return weights[0, ..., None] * out.float() + weights[1, ..., None] * sink_out
