"""GPU decode-attention benchmark: compressed pages vs a dense bf16 cache.

Run on a GPU machine (scripts/gpu_check.sh does): ``python -m benchmarks.gpu_kernels``.
Writes ``benchmarks/gpu_decode.json`` and prints a Markdown table. Importable without vLLM
and without a GPU (the planning and reporting helpers are tested on CPU).

Rows (``kernel`` field):

- ``rot-fused``: the fused paged decode attention of the first format (``seqkv-3-rot-none``);
- ``transform-recon+sdpa``: the transform format (``seqkv-3`` bit budget, K 2.5 / V 3.5 bits):
  :func:`~vllm_seqkv.kernels.reconstruct.reconstruct_transform_blocks` (fp16
  tensor-core dots, bf16 output, RoPE applied in the kernel) then torch SDPA over the
  reconstruction; ``preset`` ``seqkv-3-nox`` (no cross-layer term) and ``seqkv-3`` (one
  cross-layer layer, the previous layer's reconstruction given as a bf16 tensor, i.e. handed
  up as LayerChain does; fewer cases: its prediction costs ``2 H D^2`` MACs per token-head).
  ``latency_us_reconstruct`` is the kernel alone. The calibration is synthetic (random
  orthogonal basis, Lloyd-Max-like levels, water-filled bits): time does not depend on the
  values, correctness is checked on a small cache first (``check_transform_correctness``);
- ``transform-fused``: the same cases (same pages, RoPE table and previous) through the fused
  paged decode attention (:mod:`~vllm_seqkv.kernels.decode`, fp16 tensor-core dots,
  bf16 query and output), which reads the pages directly and writes no dense K/V; its
  ``bf16 SDPA`` figure is the one measured for the case's ``transform-recon+sdpa`` row;
- ``transform-cuda``: the same calls through the CUDA op ``seqkv::transform_decode_attention``
  (``csrc/decode.cu``: float32 CUDA-core math, no tensor cores) when ``vllm_seqkv._C``
  is built, on the smaller cases only (``times_transform_cuda``: the plain kernel is expected to
  be far slower than the tensor-core Triton one, and the script has an 8-minute budget).

Shape: a Llama-8B-like layer (8 KV heads, 32 query heads, head_dim 128), block size 16,
one query token per sequence, every sequence at the same context. seqkv timing covers the
whole wrapper (3 launches); the baseline is torch SDPA (flash/efficient backend) over a
contiguous bf16 K/V of the same contexts, i.e. a dense cache without paging overhead.
The kernel's time does not depend on the code values, so the cache is random bytes with
valid fp16 norms; correctness is checked separately (``check_correctness``, tests/kernels).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

HBM_PEAK_BYTES_PER_S = 4.8e12  # H200 HBM3e
KV_HEADS, Q_HEADS, HEAD_DIM, BLOCK_SIZE = 8, 32, 128, 16
CONTEXTS = (1024, 4096, 32768, 131072)
BATCHES = (1, 16, 64)
PRESET = "seqkv-3-rot-none"  # the seqkv-3 bit split without calibration (predictor constants add no bytes per key)
MEMORY_HEADROOM = 0.7
TRANSFORM_BITS = (2.5, 3.5)  # seqkv-3's K / V bits per element
CROSS_LAYER_CASES = ((1024, 1), (4096, 1), (4096, 16), (32768, 1), (32768, 16))
ROPE_THETA = 500000.0
TRANSFORM_PRECISION = "fp16"  # tl.dot operands of the timed transform kernels
TRANSFORM_CUDA_MAX_TOKENS = 65536  # context * batch of the cases timed on the transform CUDA op
TRANSFORM_CUDA_MAX_TOKENS_CROSS = 4096  # the same for cross-layer cases (2 H D^2 MACs per stream)


@dataclass
class Result:
    context: int
    batch: int
    latency_us_seqkv: float | None
    latency_us_bf16: float | None
    speedup_vs_bf16: float | None
    bandwidth_frac: float | None
    latency_us_seqkv_cuda: float | None = None
    kernel: str = "rot-fused"
    preset: str = PRESET
    latency_us_reconstruct: float | None = None


def build_layout(heads: int = KV_HEADS, dim: int = HEAD_DIM):
    """The SlotLayout the benchmark pages use."""
    from vllm_seqkv.codec import make_codec
    from vllm_seqkv.codec.base import SlotLayout

    key, value = make_codec(PRESET).codecs_for_layer(0)
    return SlotLayout(key, value, heads, dim)


def case_bytes(context: int, batch: int, slot_bytes: int, heads: int = KV_HEADS,
               dim: int = HEAD_DIM) -> tuple[int, int]:
    """(compressed page bytes, dense bf16 K+V bytes) of one case."""
    tokens = context * batch * heads
    return tokens * slot_bytes, tokens * dim * 2 * 2


def plan_cases(free_bytes: int, slot_bytes: int, contexts=CONTEXTS, batches=BATCHES) -> list[tuple[int, int]]:
    """(context, batch) pairs whose compressed + dense caches fit in ``MEMORY_HEADROOM * free``."""
    fits = []
    for context in contexts:
        for batch in batches:
            compressed, dense = case_bytes(context, batch, slot_bytes)
            if compressed + dense <= MEMORY_HEADROOM * free_bytes:
                fits.append((context, batch))
    return fits


def summarize(context: int, batch: int, seqkv_us: float | None, bf16_us: float | None,
              compressed_bytes: int, cuda_us: float | None = None, kernel: str = "rot-fused",
              preset: str = PRESET, reconstruct_us: float | None = None) -> Result:
    speedup = bf16_us / seqkv_us if seqkv_us and bf16_us else None
    frac = compressed_bytes / (seqkv_us * 1e-6) / HBM_PEAK_BYTES_PER_S if seqkv_us else None
    return Result(context, batch, seqkv_us, bf16_us, speedup, frac, cuda_us, kernel, preset, reconstruct_us)


def transform_case_bytes(context: int, batch: int, slot_bytes: int, cross_layer: bool,
                         heads: int = KV_HEADS, dim: int = HEAD_DIM) -> int:
    """Peak bytes of one transform case: pages + bf16 K/V reconstruction (+ the previous
    layer's bf16 K/V when cross-layer); the dense baseline is allocated after they are freed."""
    tokens = context * batch * heads
    dense = tokens * dim * 2 * 2
    return tokens * slot_bytes + dense * (2 if cross_layer else 1)


def plan_transform_cases(free_bytes: int, slot_bytes: int, contexts=CONTEXTS, batches=BATCHES
                         ) -> list[tuple[int, int, bool]]:
    """(context, batch, cross_layer): every fitting case without the cross-layer term, and
    the fitting ones of CROSS_LAYER_CASES with it."""
    plan = []
    for cross in (False, True):
        for context in contexts:
            for batch in batches:
                if cross and (context, batch) not in CROSS_LAYER_CASES:
                    continue
                if transform_case_bytes(context, batch, slot_bytes, cross) <= MEMORY_HEADROOM * free_bytes:
                    plan.append((context, batch, cross))
    return plan


def times_transform_cuda(context: int, batch: int, cross_layer: bool) -> bool:
    """Whether a transform case also gets a ``transform-cuda`` row."""
    limit = TRANSFORM_CUDA_MAX_TOKENS_CROSS if cross_layer else TRANSFORM_CUDA_MAX_TOKENS
    return context * batch <= limit


def synthetic_transform_layouts(heads: int = KV_HEADS, dim: int = HEAD_DIM, bits=TRANSFORM_BITS,
                                seed: int = 0):
    """SlotLayouts of layers 0 (no prediction) and 1 (cross-layer) of a random transform
    calibration with ``bits`` = (K, V) bits per element (the codec's own classes)."""
    from vllm_seqkv.codec.base import SlotLayout
    from vllm_seqkv.codec.crosslayer import CrossLayerCodec, LinearPredictor
    from vllm_seqkv.codec.transform import MAX_BITS, Transform, TransformCodec, allocate_bits

    gen = torch.Generator().manual_seed(seed)

    def stream(bits_per_element: float, predicted: bool):
        variance = torch.logspace(1, -3, dim, dtype=torch.float64)
        distortion = variance[:, None] * 4.0 ** -torch.arange(MAX_BITS + 1, dtype=torch.float64)
        widths = allocate_bits(distortion, round(bits_per_element * dim / 8) * 8)
        basis = torch.linalg.qr(torch.randn(heads, dim, dim, generator=gen))[0]
        levels = torch.zeros(heads, dim, 1 << MAX_BITS)
        for c in range(dim):
            n = 1 << int(widths[c])
            levels[:, c, :n] = torch.randn(heads, n, generator=gen).sort(-1).values * variance[c].sqrt().float()
        transform = Transform.from_padded(torch.randn(heads, dim, generator=gen), basis.contiguous(),
                                          widths.expand(heads, -1).clone(), levels)
        predictor = None
        if predicted:
            predictor = LinearPredictor(torch.randn(2 * heads * dim, heads * dim, generator=gen)
                                        / (2 * heads * dim) ** 0.5, torch.randn(heads * dim, generator=gen))
        return CrossLayerCodec(TransformCodec(transform), predictor)

    return [SlotLayout(stream(bits[0], layer == 1), stream(bits[1], layer == 1), heads, dim)
            for layer in range(2)]


def markdown_table(results: list[Result]) -> str:
    def fmt(x, spec):
        return "—" if x is None else format(x, spec)

    lines = ["| context | batch | seqkv µs | seqkv CUDA-op µs | bf16 SDPA µs | speedup | HBM frac "
             "| kernel | preset | reconstruct µs |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |"]
    for r in results:
        lines.append(f"| {r.context} | {r.batch} | {fmt(r.latency_us_seqkv, '.1f')} | "
                     f"{fmt(r.latency_us_seqkv_cuda, '.1f')} | {fmt(r.latency_us_bf16, '.1f')} | "
                     f"{fmt(r.speedup_vs_bf16, '.2f')} | {fmt(r.bandwidth_frac, '.2f')} | "
                     f"{r.kernel} | {r.preset} | {fmt(r.latency_us_reconstruct, '.1f')} |")
    return "\n".join(lines)


def report(results: list[Result], gpu: str, command: str) -> dict:
    return {"gpu": gpu, "date": datetime.date.today().isoformat(), "command": command,
            "results": [asdict(r) for r in results]}


def random_pages(num_blocks: int, layout, device) -> torch.Tensor:
    """Random code bytes with every norm set to fp16 1.0 (finite scores)."""
    pages = torch.randint(0, 256, (num_blocks, layout.num_kv_heads, BLOCK_SIZE, layout.slot_bytes),
                          dtype=torch.uint8, device=device)
    one = torch.tensor([1.0], dtype=torch.float16).view(torch.uint8).to(device)
    for offset in (0, layout.key_bytes):
        pages[..., offset:offset + 2] = one
    return pages


def time_us(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=50)) * 1e3


def bench_case(context: int, batch: int, layout, params, use_cuda_op: bool) -> Result:
    from vllm_seqkv.kernels.rotation.decode_attention import paged_decode_attention_triton

    device = torch.device("cuda")
    blocks_per_seq = context // BLOCK_SIZE
    pages = random_pages(batch * blocks_per_seq, layout, device)
    block_table = torch.randperm(batch * blocks_per_seq, device=device, dtype=torch.int64)
    block_table = block_table.to(torch.int32).view(batch, blocks_per_seq)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    query = torch.randn(batch, Q_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
    own_k = torch.randn(batch, KV_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
    own_v = torch.randn_like(own_k)
    scale = HEAD_DIM ** -0.5
    seqkv_us = time_us(lambda: paged_decode_attention_triton(
        query, own_k, own_v, pages, block_table, seq_lens, params, scale))
    cuda_us = None
    if use_cuda_op:
        from vllm_seqkv.kernels.cuda_ops import paged_decode_attention_cuda
        cuda_us = time_us(lambda: paged_decode_attention_cuda(
            query, own_k, own_v, pages, block_table, seq_lens, params, scale))
    compressed = pages.numel()
    pages = None  # free the pages before the dense cache is made
    dense_k = torch.randn(batch, KV_HEADS, context, HEAD_DIM, device=device, dtype=torch.bfloat16)
    dense_v = torch.randn_like(dense_k)
    q4 = query[:, :, None]  # [B, Hq, 1, D]
    bf16_us = time_us(lambda: torch.nn.functional.scaled_dot_product_attention(
        q4, dense_k, dense_v, scale=scale, enable_gqa=True))
    dense_k = dense_v = None
    torch.cuda.empty_cache()
    return summarize(context, batch, seqkv_us, bf16_us, compressed, cuda_us)


def check_correctness(params, layout, use_cuda_op: bool) -> None:
    """Small op-vs-reference check on the GPU before timing (raises on mismatch)."""
    from vllm_seqkv.kernels.rotation.decode_attention import paged_decode_attention_triton
    from vllm_seqkv.kernels.reference import paged_decode_attention_reference

    gen = torch.Generator().manual_seed(0)
    batch, blocks = 3, 20
    k = torch.randn(batch * blocks * BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=gen)
    pages = torch.zeros(batch * blocks, KV_HEADS, BLOCK_SIZE, layout.slot_bytes, dtype=torch.uint8)
    from vllm_seqkv.kernels.reference import write_slots_reference
    write_slots_reference(k, k.flip(0), torch.arange(k.shape[0]), pages, layout)
    pages = pages.cuda()
    block_table = torch.arange(batch * blocks, dtype=torch.int32).view(batch, blocks).cuda()
    seq_lens = torch.tensor([1, 77, blocks * BLOCK_SIZE], dtype=torch.int32).cuda()
    query = torch.randn(batch, Q_HEADS, HEAD_DIM, generator=gen).cuda()
    own = torch.randn(batch, KV_HEADS, HEAD_DIM, generator=gen).cuda()
    ref = paged_decode_attention_reference(query, own, own, pages, block_table, seq_lens, layout, 0.1)
    outs = {"triton": paged_decode_attention_triton(query, own, own, pages, block_table, seq_lens, params, 0.1)}
    if use_cuda_op:
        from vllm_seqkv.kernels.cuda_ops import paged_decode_attention_cuda
        outs["cuda"] = paged_decode_attention_cuda(query, own, own, pages, block_table, seq_lens, params, 0.1)
    for name, out in outs.items():
        err = (out - ref).abs().max().item()
        print(f"correctness {name}: max abs error vs reference {err:.2e}")
        if err > 1e-3:
            raise AssertionError(f"{name} decode attention differs from the reference by {err}")


@dataclass
class TransformInputs:
    """One transform case: random pages ``[B * context / bs, H, bs, S]``, a shuffled block
    table ``[B, context / bs]``, its flat ``ids``/``positions``, a RoPE table ``[context, D]``,
    bf16 queries ``[B, Hq, D]`` and own K/V ``[B, H, D]``, and (cross-layer) a bf16 previous
    ``[B * context, H, D]``."""

    params: object
    pages: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    ids: torch.Tensor
    positions: torch.Tensor
    rope: torch.Tensor
    query: torch.Tensor
    own_k: torch.Tensor
    own_v: torch.Tensor
    previous: tuple[torch.Tensor, torch.Tensor] | None


def transform_inputs(context: int, batch: int, layouts, device, cross_layer: bool,
                     group: int = Q_HEADS // KV_HEADS) -> TransformInputs:
    from vllm_seqkv.kernels.params import rope_cache, transform_layer_params
    from vllm_seqkv.kernels.reconstruct import table_block_ids

    layout = layouts[1 if cross_layer else 0]
    heads, dim = layout.num_kv_heads, layout.head_dim
    params = transform_layer_params(layout, device)
    blocks = context // BLOCK_SIZE
    pages = torch.randint(0, 256, (batch * blocks, heads, BLOCK_SIZE, layout.slot_bytes),
                          dtype=torch.uint8, device=device)
    table = torch.randperm(batch * blocks, device=device).to(torch.int32).view(batch, blocks)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    ids, positions = table_block_ids(table, seq_lens, BLOCK_SIZE)
    bf16 = dict(device=device, dtype=torch.bfloat16)
    previous = None
    if cross_layer:
        previous = tuple(torch.randn(batch * context, heads, dim, **bf16) for _ in range(2))
    own_k, own_v = (torch.randn(batch, heads, dim, **bf16) for _ in range(2))
    return TransformInputs(params, pages, table, seq_lens, ids, positions,
                           rope_cache(context, dim, ROPE_THETA, device),
                           torch.randn(batch, heads * group, dim, **bf16), own_k, own_v, previous)


def transform_calls(x: TransformInputs, use_cuda_op: bool = False) -> dict:
    """The timed calls of one case: "reconstruct" (the kernel alone), "transform-recon+sdpa"
    and "transform-fused" (both -> ``[B, Hq, D]``-shaped attention outputs), and with
    ``use_cuda_op`` "transform-cuda" (the CUDA op on the same inputs)."""
    from vllm_seqkv.kernels.decode import fused_transform_decode_attention
    from vllm_seqkv.kernels.reconstruct import reconstruct_transform_blocks

    batch, _, dim = x.query.shape
    heads, context = x.params.num_kv_heads, x.block_table.shape[1] * BLOCK_SIZE
    scale = dim ** -0.5

    def reconstruct():
        return reconstruct_transform_blocks(x.pages, x.ids, x.params, x.previous, x.rope, x.positions,
                                            out_dtype=torch.bfloat16, precision=TRANSFORM_PRECISION)

    def attend():
        key, value = reconstruct()
        k = key.view(batch, context, heads, dim).transpose(1, 2)
        v = value.view(batch, context, heads, dim).transpose(1, 2)
        return torch.nn.functional.scaled_dot_product_attention(
            x.query[:, :, None], k, v, scale=scale, enable_gqa=True)[:, :, 0]

    table_previous = None if x.previous is None else tuple(p.view(batch, context, heads, dim) for p in x.previous)

    def fused():
        return fused_transform_decode_attention(x.query, x.own_k, x.own_v, x.pages, x.block_table, x.seq_lens,
                                                x.params, scale, rope=x.rope, previous=table_previous,
                                                precision=TRANSFORM_PRECISION)

    calls = {"reconstruct": reconstruct, "transform-recon+sdpa": attend, "transform-fused": fused}
    if use_cuda_op:
        from vllm_seqkv.kernels.cuda_ops import transform_decode_attention_cuda

        calls["transform-cuda"] = lambda: transform_decode_attention_cuda(
            x.query, x.own_k, x.own_v, x.pages, x.block_table, x.seq_lens, x.params, scale, rope=x.rope,
            previous=table_previous)
    return calls


def bench_transform_case(context: int, batch: int, layouts, cross_layer: bool,
                         use_cuda_op: bool = False) -> list[Result]:
    """The case's ``transform-recon+sdpa`` and ``transform-fused`` rows (one bf16 baseline),
    and ``transform-cuda`` when the op is built and the case is small enough."""
    device = torch.device("cuda")
    inputs = transform_inputs(context, batch, layouts, device, cross_layer)
    calls = transform_calls(inputs, use_cuda_op and times_transform_cuda(context, batch, cross_layer))
    times = {name: time_us(call) for name, call in calls.items()}
    compressed = inputs.pages.numel()
    del inputs, calls
    torch.cuda.empty_cache()
    query = torch.randn(batch, Q_HEADS, 1, HEAD_DIM, device=device, dtype=torch.bfloat16)
    dense_k = torch.randn(batch, KV_HEADS, context, HEAD_DIM, device=device, dtype=torch.bfloat16)
    dense_v = torch.randn_like(dense_k)
    bf16_us = time_us(lambda: torch.nn.functional.scaled_dot_product_attention(
        query, dense_k, dense_v, scale=HEAD_DIM ** -0.5, enable_gqa=True))
    dense_k = dense_v = None
    torch.cuda.empty_cache()
    preset = "seqkv-3" if cross_layer else "seqkv-3-nox"
    rows = [summarize(context, batch, times["transform-recon+sdpa"], bf16_us, compressed,
                      kernel="transform-recon+sdpa", preset=preset, reconstruct_us=times["reconstruct"]),
            summarize(context, batch, times["transform-fused"], bf16_us, compressed,
                      kernel="transform-fused", preset=preset)]
    if "transform-cuda" in times:
        rows.append(summarize(context, batch, times["transform-cuda"], bf16_us, compressed,
                              kernel="transform-cuda", preset=preset))
    return rows


def check_transform_correctness(layouts, device, heads: int = KV_HEADS, dim: int = HEAD_DIM,
                                precisions=("ieee", "fp16", "bf16"), use_cuda_op: bool = False
                                ) -> dict[str, float]:
    """Kernel write + reconstruct (both layers, RoPE), reconstruct+SDPA decode and the fused
    decode (fp32 and the timed precision), and with ``use_cuda_op`` the CUDA ops' write and
    decode, vs the codec's torch code on a small cache; returns the max errors (raises past
    tolerance)."""
    from vllm_seqkv.kernels.reference import (
        reconstruct_transform_reference,
        transform_decode_attention_reference,
        write_transform_reference,
    )
    from vllm_seqkv.kernels.decode import fused_transform_decode_attention
    from vllm_seqkv.kernels.params import rope_cache, transform_layer_params
    from vllm_seqkv.kernels.reconstruct import (
        reconstruct_transform_blocks,
        table_block_ids,
        transform_decode_attention,
    )
    from vllm_seqkv.kernels.write import write_transform_slots

    gen = torch.Generator().manual_seed(0)
    lengths = [1, 2 * BLOCK_SIZE + 5]
    blocks = 3
    table = torch.tensor([[4, -1, -1], [2, 0, 3]], dtype=torch.int32)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    slots = torch.cat([table[i, torch.arange(n) // BLOCK_SIZE].long() * BLOCK_SIZE + torch.arange(n) % BLOCK_SIZE
                       for i, n in enumerate(lengths)])
    rows = torch.cat([i * blocks * BLOCK_SIZE + torch.arange(n) for i, n in enumerate(lengths)])  # output rows
    ids, positions = table_block_ids(table.clamp(min=0), seq_lens, BLOCK_SIZE)
    rope = rope_cache(blocks * BLOCK_SIZE, dim, ROPE_THETA)
    errors, previous, previous_dev = {}, None, None
    for layer, layout in enumerate(layouts):
        params = transform_layer_params(layout, device)
        key, value = (torch.randn(len(slots), heads, dim, generator=gen) for _ in range(2))
        expected = torch.zeros(5, heads, BLOCK_SIZE, layout.slot_bytes, dtype=torch.uint8)
        pages = expected.to(device)
        prev_rows = None if previous is None else tuple(p[rows] for p in previous)
        write_transform_reference(key, value, slots, expected, layout, prev_rows)
        write_transform_slots(key.to(device), value.to(device), slots.to(device), pages, params,
                              None if prev_rows is None else tuple(p.to(device).contiguous() for p in prev_rows))
        errors[f"layer{layer} write bytes differing"] = (pages.cpu() != expected).float().mean().item()
        if use_cuda_op:
            from vllm_seqkv.kernels.cuda_ops import write_transform_slots_cuda

            pages_cuda = torch.zeros_like(pages)
            write_transform_slots_cuda(key.to(device), value.to(device), slots.to(device), pages_cuda, params,
                                       None if prev_rows is None
                                       else tuple(p.to(device).contiguous() for p in prev_rows))
            errors[f"layer{layer} cuda write bytes differing"] = (pages_cuda.cpu() != expected).float().mean().item()
        ref = reconstruct_transform_reference(expected, ids, layout, previous, rope, positions,
                                              keep_code_frame=True)
        for precision in precisions:
            out = reconstruct_transform_blocks(expected.to(device), ids.to(device), params, previous_dev,
                                               rope.to(device), positions.to(device), precision=precision,
                                               keep_code_frame=True)
            err = max((o.cpu() - r).abs().max().item() / (1 + r.abs().max().item()) for o, r in zip(out, ref))
            errors[f"layer{layer} reconstruct {precision}"] = err
        query = torch.randn(2, 2 * heads, dim, generator=gen)
        own_k, own_v = (torch.randn(2, heads, dim, generator=gen) for _ in range(2))
        prev_table = None if previous is None else tuple(p.view(2, blocks * BLOCK_SIZE, heads, dim) for p in previous)
        att_ref = transform_decode_attention_reference(query, own_k, own_v, expected, table.clamp(min=0), seq_lens,
                                                       layout, dim ** -0.5, rope, prev_table)
        args = (query.to(device), own_k.to(device), own_v.to(device), expected.to(device),
                table.clamp(min=0).to(device), seq_lens.to(device), params, dim ** -0.5, rope.to(device),
                None if prev_table is None else tuple(p.to(device) for p in prev_table))
        att = transform_decode_attention(*args)
        errors[f"layer{layer} decode attention"] = (att.cpu() - att_ref).abs().max().item()
        for precision in ("ieee", TRANSFORM_PRECISION):
            fused = fused_transform_decode_attention(*args, precision=precision)
            errors[f"layer{layer} decode attention fused {precision}"] = (fused.cpu() - att_ref).abs().max().item()
        if use_cuda_op:
            from vllm_seqkv.kernels.cuda_ops import transform_decode_attention_cuda

            out = transform_decode_attention_cuda(*args[:8], rope=args[8], previous=args[9])
            errors[f"layer{layer} decode attention cuda"] = (out.cpu() - att_ref).abs().max().item()
        previous = (ref[2], ref[1])
        previous_dev = tuple(p.to(device).contiguous() for p in previous)
    limits = {"write bytes differing": 1e-3, "reconstruct ieee": 1e-4, "reconstruct tf32": 1e-2,
              "reconstruct fp16": 2e-2, "reconstruct bf16": 5e-2, "decode attention": 1e-3,
              "fused ieee": 1e-3, "fused fp16": 1e-2, "attention cuda": 1e-3}
    for name, err in errors.items():
        print(f"transform correctness {name}: {err:.2e}")
        limit = next(v for k, v in limits.items() if name.endswith(k))
        if not err <= limit:
            raise AssertionError(f"transform kernels: {name} = {err} > {limit}")
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/gpu_decode.json")
    parser.add_argument("--contexts", type=int, nargs="*", default=list(CONTEXTS))
    parser.add_argument("--batches", type=int, nargs="*", default=list(BATCHES))
    parser.add_argument("--budget-s", type=float, default=230.0,
                        help="start no new case after this many seconds (the rest are listed as skipped)")
    parser.add_argument("--skip-rot", action="store_true", help="only the transform-format rows")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device; nothing measured", file=sys.stderr)
        return 2
    from vllm_seqkv.kernels import layer_params
    from vllm_seqkv.kernels.cuda_ops import load_cuda_ops

    started = time.monotonic()
    layout = build_layout()
    params = layer_params(layout, "cuda")
    use_cuda_op = load_cuda_ops()
    check_correctness(params, layout, use_cuda_op)
    layouts = synthetic_transform_layouts()
    check_transform_correctness(layouts, torch.device("cuda"), use_cuda_op=use_cuda_op)
    free, _ = torch.cuda.mem_get_info()
    cases = [] if args.skip_rot else [("rot", c, b, False) for c, b in
                                      plan_cases(free, layout.slot_bytes, args.contexts, args.batches)]
    cases += [("transform", c, b, x) for c, b, x in
              plan_transform_cases(free, layouts[0].slot_bytes, args.contexts, args.batches)]
    cases.sort(key=lambda case: (case[1] * case[2], case[1], case[0], case[3]))  # budget cuts the largest
    planned = {(k, c, b, x) for k, c, b, x in cases}
    skipped = [(k, c, b) for k in ("rot", "transform") for c in args.contexts for b in args.batches
               if (k, c, b, False) not in planned and not (k == "rot" and args.skip_rot)]
    if skipped:
        print(f"skipped (do not fit in memory): {skipped}")
    results = []
    for kind, context, batch, cross in cases:
        if time.monotonic() - started > args.budget_s:
            print(f"time budget spent: not run {kind} context {context} batch {batch} cross_layer {cross}")
            continue
        if kind == "rot":
            rows = [bench_case(context, batch, layout, params, use_cuda_op)]
        else:
            rows = bench_transform_case(context, batch, layouts, cross, use_cuda_op)
        results.extend(rows)
        print("\n".join(markdown_table(rows).splitlines()[2:]), flush=True)
    command = "python -m benchmarks.gpu_kernels " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report(results, torch.cuda.get_device_name(), command.strip()), indent=2) + "\n")
    print(markdown_table(results))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
