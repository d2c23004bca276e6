"""Free-running generation through the ruler's forward, with a KV codec in the cache.

What a user sees when the model talks on top of its own compressed cache: the prompt is
prefilled with the codec's decode-path reads (:func:`~benchmarks.forward.run_window`),
then each new token attends over the cache in which every earlier position is read as the
codec decodes it (coded before ``exact_window_start``, sinks and own K/V exact; block codecs
code a block once it is complete), batched over sequences. On a sliding-window layer a token
at ``p`` reads ``p - W < j <= p`` only, the sinks exact only while its window starts at 0
(the rule of :mod:`benchmarks.attention`).

Shapes: caches are ``[B, T_max, H_kv, D]`` per layer (``T_max`` = longest prompt + new tokens);
sequences advance one token per step at their own positions.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from benchmarks.forward import run_window
from benchmarks.model import LlamaForward, apply_rope
from vllm_seqkv.codec.base import KVCodec


@dataclass
class _LayerCache:
    """One layer's cache for a batch: exact post-RoPE keys, values, and (with a codec) what
    the codec returns for each position (keys post-RoPE) and the keys in the coding frame."""

    key: torch.Tensor
    value: torch.Tensor
    coded_key: torch.Tensor | None = None
    coded_value: torch.Tensor | None = None
    frame_key: torch.Tensor | None = None


@torch.inference_mode()
def generate(model: LlamaForward, prompts: list[torch.Tensor], codec: KVCodec | None,
             max_new_tokens: int, temperature: float = 0.0, seeds: list[int] | None = None,
             stop_ids: tuple[int, ...] = (), batch_size: int = 32) -> list[list[int]]:
    """Continue each prompt (``[P_b]`` token ids) by up to ``max_new_tokens`` tokens.

    ``temperature`` 0: greedy; else sampling from ``softmax(logits / temperature)`` with one
    ``torch.Generator`` per sequence seeded by ``seeds[b]`` (so the exact and the coded run
    draw from the same random stream). A sequence stops after emitting one of ``stop_ids``
    (the stop token is kept). Returns the new token ids per prompt.
    """
    if temperature > 0 and (seeds is None or len(seeds) != len(prompts)):
        raise ValueError("sampling needs one seed per prompt")
    out: list[list[int]] = []
    for first in range(0, len(prompts), batch_size):
        part = slice(first, first + batch_size)
        out += _generate_batch(model, prompts[part], codec, max_new_tokens, temperature,
                               seeds[part] if seeds is not None else None, stop_ids)
    return out


def _generate_batch(model, prompts, codec, max_new_tokens, temperature, seeds, stop_ids):
    batch = len(prompts)
    lengths = torch.tensor([p.numel() for p in prompts])
    t_max = int(lengths.max()) + max_new_tokens
    caches, next_logits = _prefill(model, prompts, codec, t_max)
    generators = None
    if temperature > 0:
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    tokens = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool)
    stops = torch.tensor(list(stop_ids), dtype=torch.long)
    positions = lengths.clone()  # position of the token about to be fed
    for step in range(max_new_tokens):
        chosen = _choose(next_logits, temperature, generators)
        for b in range(batch):
            if not done[b]:
                tokens[b].append(int(chosen[b]))
        done |= torch.isin(chosen, stops)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        next_logits = _step(model, caches, chosen, positions, codec)
        positions += 1
    return tokens


def _prefill(model: LlamaForward, prompts, codec, t_max):
    cfg = model.config
    model.check_context(t_max)
    batch = len(prompts)
    shape = (batch, t_max, cfg.num_kv_heads, cfg.head_dim)
    caches = []
    for _ in range(cfg.num_layers):
        cache = _LayerCache(torch.zeros(shape), torch.zeros(shape))
        if codec is not None:
            cache.coded_key, cache.coded_value = torch.zeros(shape), torch.zeros(shape)
            cache.frame_key = torch.zeros(shape)
        caches.append(cache)
    last_logits = []
    for b, prompt in enumerate(prompts):
        result = run_window(model, prompt, codec, collect_kv=True, collect_coded=codec is not None)
        last_logits.append(result.log_probs[-1])
        n = prompt.numel()
        for layer, cache in enumerate(caches):
            kv = result.kv[layer]
            cache.key[b, :n], cache.value[b, :n] = kv.key, kv.value
            if codec is not None:
                cache.coded_key[b, :n], cache.coded_value[b, :n] = result.coded[layer]
                cache.frame_key[b, :n] = kv.key_pre if codec.pre_rope_keys else kv.key
    return caches, torch.stack(last_logits)


def _choose(log_probs: torch.Tensor, temperature: float, generators) -> torch.Tensor:
    if generators is None:
        return log_probs.argmax(-1)
    probs = torch.softmax(log_probs / temperature, dim=-1)
    return torch.cat([torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(generators)])


def _step(model: LlamaForward, caches: list[_LayerCache], tokens: torch.Tensor, positions: torch.Tensor,
          codec: KVCodec | None) -> torch.Tensor:
    """Feed ``tokens [B]`` at ``positions [B]``; returns next-token log-probs ``[B, vocab]``."""
    batch = tokens.numel()
    rows = torch.arange(batch)
    t_max = caches[0].key.shape[1]
    cols = torch.arange(t_max)
    visible = cols[None, :] <= positions[:, None]  # [B, T_max]
    starts = None
    if codec is not None:
        starts = torch.tensor([min(codec.exact_window_start(int(p)), int(p)) for p in positions])
    h = model.embed(tokens)
    previous = None
    for layer, cache in enumerate(caches):
        window = model.window(layer)
        seen, coded = visible, None
        if window is not None:
            seen = visible & (cols[None, :] > positions[:, None] - window)
        if starts is not None:
            sinks = cols[None, :] < codec.sink_tokens
            if window is not None:  # sinks are exact only while the window starts at position 0
                sinks = sinks & (positions[:, None] < window)
            coded = (cols[None, :] < starts[:, None]) & ~sinks
        q, kv = model.qkv(layer, h, positions)
        cache.key[rows, positions], cache.value[rows, positions] = kv.key, kv.value
        if codec is not None:
            previous = _code_new_rows(codec, layer, cache, kv, positions, functools.partial(model.rope, layer),
                                      previous)
        keys, values = cache.key, cache.value
        if coded is not None:
            keys = torch.where(coded[:, :, None, None], cache.coded_key, cache.key)
            values = torch.where(coded[:, :, None, None], cache.coded_value, cache.value)
        out = _attend(q, keys, values, seen)
        h = model.finish_layer(layer, h, out)
    return torch.log_softmax(model.logits(h), dim=-1)


def _code_new_rows(codec: KVCodec, layer: int, cache: _LayerCache, kv, positions, rope, previous):
    """Store what the codec returns for the new positions: per-token codecs code each new row
    now (cross-layer ones against the layer below's rows, returned for the layer above); block
    codecs code a block of a sequence when its last row arrives. ``rope``: positions ``[N]`` ->
    this layer's ``cos, sin [N, D]`` (:meth:`LlamaForward.rope`)."""
    key_codec, value_codec = codec.codecs_for_layer(layer)
    rows = torch.arange(positions.numel())
    frame = kv.key_pre if codec.pre_rope_keys else kv.key
    cache.frame_key[rows, positions] = frame
    size = codec.block_size
    if size == 1:
        coded_frame = _roundtrip(key_codec, frame, previous)
        coded_value = _roundtrip(value_codec, kv.value, previous)
        coded_key = apply_rope(coded_frame, *rope(positions)) if codec.pre_rope_keys else coded_frame
        cache.coded_key[rows, positions] = coded_key
        cache.coded_value[rows, positions] = coded_value
        return (coded_frame, coded_value) if codec.cross_layer else None
    for b in rows.tolist():
        end = int(positions[b]) + 1
        if end % size:
            continue
        block = slice(end - size, end)
        coded_frame = key_codec.decode(key_codec.encode(cache.frame_key[b, block].contiguous())).float()
        if codec.pre_rope_keys:
            coded_frame = apply_rope(coded_frame, *rope(torch.arange(end - size, end)))
        cache.coded_key[b, block] = coded_frame
        cache.coded_value[b, block] = value_codec.decode(value_codec.encode(cache.value[b, block].contiguous())).float()
    return None


def _roundtrip(codec, stream: torch.Tensor, previous) -> torch.Tensor:
    if codec.takes_previous:
        return codec.decode(codec.encode(stream, previous), previous).float()
    return codec.decode(codec.encode(stream.contiguous())).float()


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """One query per sequence: ``q [B, Hq, D]`` over ``keys/values [B, T, H_kv, D]`` where
    ``visible [B, T]`` -> ``[B, Hq, D]``."""
    batch, heads, dim = q.shape
    kv_heads = keys.shape[2]
    qg = q.view(batch, kv_heads, heads // kv_heads, dim)
    scores = torch.einsum("bhgd,bthd->bhgt", qg, keys) * dim ** -0.5
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    out = torch.einsum("bhgt,bthd->bhgd", scores.softmax(-1), values)
    return out.reshape(batch, heads, dim)
