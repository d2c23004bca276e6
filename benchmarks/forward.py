"""One teacher-forced window through :class:`LlamaForward`, optionally with a coded cache.

With a codec, every layer ``l`` codes its K (post-RoPE, as cached; pre-RoPE and rotated
back after decoding when ``codec.pre_rope_keys``) and V with ``codec.codecs_for_layer(l)``
(cross-layer codecs get the reconstruction of layer ``l - 1``, as the decoder has it)
(encode -> decode over the whole window; block codecs see aligned blocks from position 0)
and attention reads them with the decode-path semantics of
:mod:`benchmarks.attention`, within the layer's sliding window where it has one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from benchmarks.attention import QUERY_CHUNK, attention, check_causal, read_starts
from benchmarks.model import LayerKV, LlamaForward, apply_rope
from vllm_seqkv.codec.base import KVCodec


@dataclass
class WindowResult:
    """``log_probs [T, vocab]`` (log-softmax of the logits), optional per-layer K/V, and per
    layer the squared attention-output error and squared exact-output norm (coded runs; over
    the last ``QUERY_CHUNK`` queries of the window, the longest contexts, where the coded
    output is compared with the exact-cache output for the same queries); with
    ``collect_coded``, per layer what the codec returns for every position (keys post-RoPE,
    values), ``[T, H_kv, D]`` each (the tail of an incomplete block is exact)."""

    log_probs: torch.Tensor
    kv: list[LayerKV] = field(default_factory=list)
    attn_err_sq: list[float] = field(default_factory=list)
    attn_ref_sq: list[float] = field(default_factory=list)
    coded: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


@torch.inference_mode()
def run_window(model: LlamaForward, tokens: torch.Tensor, codec: KVCodec | None = None,
               collect_kv: bool = False, measure_attention: bool = False,
               collect_coded: bool = False) -> WindowResult:
    """Forward ``tokens [T]`` (positions ``0..T-1``) and return :class:`WindowResult`."""
    length = tokens.numel()
    model.check_context(length)
    cfg = model.config
    positions = torch.arange(length)
    starts = None
    if codec is not None:
        check_causal(codec, length)
        starts = read_starts(codec, length)
    h = model.embed(tokens)
    result = WindowResult(log_probs=torch.empty(0))
    previous = None  # the layer below's reconstruction, for cross-layer codecs
    for layer in range(cfg.num_layers):
        q, kv = model.qkv(layer, h, positions)
        if collect_kv:
            result.kv.append(kv)
        if codec is None:
            out = attention(q, kv.key, kv.value, window=model.window(layer))
        else:
            key_codec, value_codec = codec.codecs_for_layer(layer)
            framed_key = _roundtrip(key_codec, kv.key_pre if codec.pre_rope_keys else kv.key, previous)
            coded_value = _roundtrip(value_codec, kv.value, previous)
            coded_key = apply_rope(framed_key, *model.rope(layer, positions)) if codec.pre_rope_keys else framed_key
            previous = (framed_key, coded_value) if codec.cross_layer else None
            if collect_coded:
                result.coded.append((coded_key, coded_value))
            rows = min(QUERY_CHUNK, length) if measure_attention else 0
            got = attention(q, kv.key, kv.value, coded_key, coded_value, starts, codec.sink_tokens, rows,
                            window=model.window(layer))
            out = got[0] if measure_attention else got
            if measure_attention:
                result.attn_err_sq.append(float((out[-rows:] - got[1]).pow(2).sum()))
                result.attn_ref_sq.append(float(got[1].pow(2).sum()))
        h = model.finish_layer(layer, h, out)
    result.log_probs = torch.log_softmax(model.logits(h), dim=-1)
    return result


def _roundtrip(codec, stream: torch.Tensor, previous=None) -> torch.Tensor:
    """Encode -> decode ``stream [T, H_kv, D]``; the tail that does not fill a block stays
    exact (only ever read exactly, see :func:`check_causal`). ``previous``: the layer below's
    reconstruction, for cross-layer codecs (per-token codecs only, so no tail)."""
    usable = stream.shape[0] - stream.shape[0] % codec.block_size
    decoded = stream.clone()
    if codec.takes_previous:
        decoded[:] = codec.decode(codec.encode(stream, previous), previous).float()
    elif usable:
        decoded[:usable] = codec.decode(codec.encode(stream[:usable].contiguous())).float()
    return decoded
