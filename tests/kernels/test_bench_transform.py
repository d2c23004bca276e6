"""The CPU-checkable parts of the GPU benchmark's transform-format rows."""

import pytest
import torch

from benchmarks import gpu_kernels as bench_gpu
from vllm_seqkv.kernels.reference import transform_decode_attention_reference


def test_synthetic_layouts_have_the_seqkv3_budget_and_a_cross_layer_layer():
    layouts = bench_gpu.synthetic_transform_layouts(heads=2, dim=64)
    assert layouts[0].slot_bytes == (160 + 224) // 8  # K 2.5 + V 3.5 bits x 64
    assert not layouts[0].key.takes_previous and layouts[1].key.takes_previous
    big = bench_gpu.synthetic_transform_layouts()[0]
    assert big.slot_bytes == 96 and big.num_kv_heads == bench_gpu.KV_HEADS


def test_transform_plan_fits_memory_and_limits_cross_layer_cases():
    slot = 96
    assert bench_gpu.transform_case_bytes(1024, 1, slot, False) == 1024 * 8 * (96 + 512)
    assert bench_gpu.transform_case_bytes(1024, 1, slot, True) == 1024 * 8 * (96 + 1024)
    plan = bench_gpu.plan_transform_cases(139 * 2**30, slot)
    assert sum(not cross for *_, cross in plan) == 12
    assert {(c, b) for c, b, cross in plan if cross} == set(bench_gpu.CROSS_LAYER_CASES)
    small = bench_gpu.plan_transform_cases(8 * 2**30, slot)
    assert (131072, 64, False) not in small and (1024, 1, True) in small


def test_transform_rows_in_report_and_table():
    row = bench_gpu.summarize(4096, 1, 80.0, 40.0, 1_000_000, kernel="transform-recon+sdpa",
                              preset="seqkv-3-nox", reconstruct_us=60.0)
    assert row.speedup_vs_bf16 == 0.5 and row.latency_us_reconstruct == 60.0
    doc = bench_gpu.report([row], "H200", "cmd")
    assert doc["results"][0]["kernel"] == "transform-recon+sdpa"
    assert "| transform-recon+sdpa | seqkv-3-nox | 60.0 |" in bench_gpu.markdown_table([row])


def test_fused_row_is_in_report_and_table():
    row = bench_gpu.summarize(4096, 1, 30.0, 40.0, 1_000_000, kernel="transform-fused", preset="seqkv-3")
    assert row.latency_us_reconstruct is None and abs(row.speedup_vs_bf16 - 4 / 3) < 1e-12
    assert "| transform-fused | seqkv-3 | — |" in bench_gpu.markdown_table([row])


def test_transform_cuda_rows_only_on_small_cases():
    assert bench_gpu.times_transform_cuda(4096, 16, False) and not bench_gpu.times_transform_cuda(32768, 16, False)
    assert bench_gpu.times_transform_cuda(4096, 1, True) and not bench_gpu.times_transform_cuda(4096, 16, True)
    row = bench_gpu.summarize(4096, 1, 300.0, 40.0, 1_000_000, kernel="transform-cuda", preset="seqkv-3-nox")
    assert "| transform-cuda | seqkv-3-nox | — |" in bench_gpu.markdown_table([row])


@pytest.mark.parametrize("cross_layer", [False, True])
def test_timed_transform_calls_run_on_cpu(cross_layer, device):
    """The benchmark's three timed calls on one small case (random pages); the fused one
    (fp16 dots, bf16 in and out) against the reference decode attention of the same inputs."""
    layouts = bench_gpu.synthetic_transform_layouts(heads=2, dim=32)
    inputs = bench_gpu.transform_inputs(3 * bench_gpu.BLOCK_SIZE, 2, layouts, device, cross_layer, group=2)
    assert inputs.params.cross_layer == cross_layer and inputs.query.shape == (2, 4, 32)
    calls = bench_gpu.transform_calls(inputs)
    assert "transform-cuda" not in calls  # only with use_cuda_op (a built extension, on a GPU)
    key, value = calls["reconstruct"]()
    assert key.shape == (2 * 3 * bench_gpu.BLOCK_SIZE, 2, 32) and key.dtype == torch.bfloat16
    recon, fused = calls["transform-recon+sdpa"](), calls["transform-fused"]()
    assert recon.shape == fused.shape == (2, 4, 32) and fused.dtype == torch.bfloat16
    x = inputs
    previous = None if x.previous is None else tuple(p.view(2, -1, 2, 32) for p in x.previous)
    ref = transform_decode_attention_reference(x.query.float(), x.own_k.float(), x.own_v.float(), x.pages,
                                               x.block_table, x.seq_lens, layouts[int(cross_layer)],
                                               32 ** -0.5, rope=x.rope, previous=previous)
    torch.testing.assert_close(fused.float().cpu(), ref.cpu(), atol=3e-2, rtol=3e-2)


def test_transform_correctness_check_runs_on_cpu(device):
    """The GPU script's correctness gate, here in Triton's interpreter on small shapes."""
    layouts = bench_gpu.synthetic_transform_layouts(heads=2, dim=32)
    errors = bench_gpu.check_transform_correctness(layouts, device, heads=2, dim=32,
                                                   precisions=("ieee", "fp16"))
    assert errors["layer1 reconstruct ieee"] < 1e-4 and errors["layer1 decode attention"] < 1e-3
    assert errors["layer1 decode attention fused ieee"] < 1e-3
    assert errors["layer1 decode attention fused fp16"] < 1e-2
    assert set(errors) >= {"layer0 write bytes differing", "layer1 write bytes differing"}


def test_gpu_script_parses_and_calls_the_bench_with_known_flags(tmp_path):
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "benchmarks.gpu_kernels" in text and "--budget-s" in text
    if not torch.cuda.is_available():  # flags parse, then the bench refuses without a GPU
        assert bench_gpu.main(["--out", str(tmp_path / "x.json"), "--budget-s", "5", "--skip-rot"]) == 2
