"""GPU decode-attention benchmark: compressed pages (seqkv-3-rot format) vs a dense bf16 cache.

Run on a GPU machine (scripts/gpu_check.sh does): ``python -m vllm_seqkv.kernels.bench_gpu``.
Writes ``benchmarks/gpu_decode.json`` and prints a Markdown table. Importable without vLLM
and without a GPU (the planning and reporting helpers are tested on CPU).

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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

HBM_PEAK_BYTES_PER_S = 4.8e12  # H200 HBM3e
KV_HEADS, Q_HEADS, HEAD_DIM, BLOCK_SIZE = 8, 32, 128, 16
CONTEXTS = (1024, 4096, 32768, 131072)
BATCHES = (1, 16, 64)
PRESET = "seqkv-3-rot-none"  # the seqkv-3 bit split without calibration (predictor constants add no bytes per key)
MEMORY_HEADROOM = 0.7


@dataclass
class Result:
    context: int
    batch: int
    latency_us_seqkv: float | None
    latency_us_bf16: float | None
    speedup_vs_bf16: float | None
    bandwidth_frac: float | None
    latency_us_seqkv_cuda: float | None = None


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
              compressed_bytes: int, cuda_us: float | None = None) -> Result:
    speedup = bf16_us / seqkv_us if seqkv_us and bf16_us else None
    frac = compressed_bytes / (seqkv_us * 1e-6) / HBM_PEAK_BYTES_PER_S if seqkv_us else None
    return Result(context, batch, seqkv_us, bf16_us, speedup, frac, cuda_us)


def markdown_table(results: list[Result]) -> str:
    def fmt(x, spec):
        return "—" if x is None else format(x, spec)

    lines = ["| context | batch | seqkv µs | seqkv CUDA-op µs | bf16 SDPA µs | speedup | HBM frac |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r.context} | {r.batch} | {fmt(r.latency_us_seqkv, '.1f')} | "
                     f"{fmt(r.latency_us_seqkv_cuda, '.1f')} | {fmt(r.latency_us_bf16, '.1f')} | "
                     f"{fmt(r.speedup_vs_bf16, '.2f')} | {fmt(r.bandwidth_frac, '.2f')} |")
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
    from vllm_seqkv.kernels.decode_attention import paged_decode_attention_triton

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
    del pages
    dense_k = torch.randn(batch, KV_HEADS, context, HEAD_DIM, device=device, dtype=torch.bfloat16)
    dense_v = torch.randn_like(dense_k)
    q4 = query[:, :, None]  # [B, Hq, 1, D]
    bf16_us = time_us(lambda: torch.nn.functional.scaled_dot_product_attention(
        q4, dense_k, dense_v, scale=scale, enable_gqa=True))
    del dense_k, dense_v
    torch.cuda.empty_cache()
    return summarize(context, batch, seqkv_us, bf16_us, compressed, cuda_us)


def check_correctness(params, layout, use_cuda_op: bool) -> None:
    """Small op-vs-reference check on the GPU before timing (raises on mismatch)."""
    from vllm_seqkv.kernels.decode_attention import paged_decode_attention_triton
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/gpu_decode.json")
    parser.add_argument("--contexts", type=int, nargs="*", default=list(CONTEXTS))
    parser.add_argument("--batches", type=int, nargs="*", default=list(BATCHES))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device; nothing measured", file=sys.stderr)
        return 2
    from vllm_seqkv.kernels import layer_params
    from vllm_seqkv.kernels.cuda_ops import load_cuda_ops

    layout = build_layout()
    params = layer_params(layout, "cuda")
    use_cuda_op = load_cuda_ops()
    check_correctness(params, layout, use_cuda_op)
    free, _ = torch.cuda.mem_get_info()
    cases = plan_cases(free, layout.slot_bytes, args.contexts, args.batches)
    skipped = [(c, b) for c in args.contexts for b in args.batches if (c, b) not in cases]
    if skipped:
        print(f"skipped (do not fit in memory): {skipped}")
    results = []
    for context, batch in cases:
        results.append(bench_case(context, batch, layout, params, use_cuda_op))
        print(markdown_table(results[-1:]).splitlines()[-1], flush=True)
    command = "python -m vllm_seqkv.kernels.bench_gpu " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report(results, torch.cuda.get_device_name(), command.strip()), indent=2) + "\n")
    print(markdown_table(results))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
