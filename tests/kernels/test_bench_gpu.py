"""The CPU-importable parts of the GPU benchmark (planning, accounting, report format)."""

import json

from benchmarks import gpu_kernels as bench_gpu


def test_layout_is_the_preset_bit_budget():
    from vllm_seqkv.codec import make_codec

    layout = bench_gpu.build_layout()
    bits = make_codec(bench_gpu.PRESET).bits_per_element(bench_gpu.KV_HEADS, bench_gpu.HEAD_DIM, 1 << 20)
    assert abs(8 * layout.slot_bytes / (2 * bench_gpu.HEAD_DIM) - bits) < 0.05


def test_plan_skips_cases_that_do_not_fit():
    slot = 92
    compressed, dense = bench_gpu.case_bytes(131072, 64, slot)
    assert dense == 131072 * 64 * 8 * 128 * 4 and compressed == 131072 * 64 * 8 * slot
    every = bench_gpu.plan_cases(139 * 2**30, slot)
    assert len(every) == 12
    small = bench_gpu.plan_cases(8 * 2**30, slot)
    assert (131072, 64) not in small and (1024, 1) in small


def test_summary_and_report_format():
    row = bench_gpu.summarize(4096, 16, seqkv_us=50.0, bf16_us=150.0, compressed_bytes=48_000_000)
    assert row.speedup_vs_bf16 == 3.0
    assert abs(row.bandwidth_frac - 48e6 / 50e-6 / 4.8e12) < 1e-12
    doc = bench_gpu.report([row], "H200", "cmd")
    assert set(doc) == {"gpu", "date", "command", "results"}
    assert {"context", "batch", "latency_us_seqkv", "latency_us_bf16", "speedup_vs_bf16",
            "bandwidth_frac"} <= set(doc["results"][0])
    json.dumps(doc)
    table = bench_gpu.markdown_table([row, bench_gpu.summarize(1024, 1, None, None, 0)])
    assert "| 4096 | 16 | 50.0 |" in table and "—" in table


def test_main_refuses_without_gpu(tmp_path):
    import torch

    if not torch.cuda.is_available():
        assert bench_gpu.main(["--out", str(tmp_path / "x.json")]) == 2
