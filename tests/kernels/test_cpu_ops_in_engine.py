"""The C++ CPU ops inside a real vLLM engine (``SEQKV_KERNELS=cpp``, what ``auto`` picks on CPU
when vllm_seqkv._cpu is built), compared with the same engine on the torch path, for
``seqkv-3-nox`` (no cross-layer prediction): the C++ write, the fused decode attention of every
decode step (exact sink rows merged by the log-sum-exp) and the C++ block reconstruction of
prefill, and the shared-prefix decode. ``SEQKV_KERNELS_CHECK=1`` compares every kernel call
with the reference on the engine's own pages (see tests/e2e/test_kernels_in_engine.py, whose
engine runner this reuses)."""

import os
import re

import pytest

from tests.e2e.test_kernels_in_engine import kernel_errors, ppl, prompts, run_engine  # noqa: F401 (fixture)

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(os.environ.get("SEQKV_NO_CPU_EXT") == "1", reason="SEQKV_NO_CPU_EXT=1")]


def test_cpp_ops_in_the_engine_match_the_torch_path(tiny_model_dir, prompts, nox_calibration):  # noqa: F811
    options = {"preset": "seqkv-3-nox", "calibration": str(nox_calibration),
               "shared_prefix_min_saved_positions": 0}  # the prompts below share 256 positions
    # a third prompt shares the first one's leading 290 tokens (two 128-token blocks in the prefix
    # cache): their decodes read that prefix once per layer (decode_plan.SharedPrefix)
    prompts = [*prompts, prompts[0][:290] + prompts[1][:10]]
    reference, _ = run_engine(tiny_model_dir, prompts, options, "torch")
    cpp_run, log = run_engine(tiny_model_dir, prompts, options, "cpp")
    assert "seqkv kernels: cpp implementation on cpu" in log
    assert "decode reads a prefix of 256 positions shared by 2 sequences" in log
    decode = kernel_errors(log, "fused decode")
    assert decode and max(decode) < 1e-4, decode  # every decode step of layers 1-3
    recon = kernel_errors(log, "reconstruction")
    assert recon and max(recon) < 1e-4, recon  # prefill reads
    differ = [float(e) for e in re.findall(r"written bytes differing from the reference so far (\S+)", log)]
    # the codec's own bytes, up to codes one level away at decision thresholds (the engine's
    # write computes the components with its own multiply-adds, not the codec's einsum)
    assert differ and max(differ) < 1e-3, differ
    assert abs(ppl(cpp_run["logprobs"]) / ppl(reference["logprobs"]) - 1) < 0.01
    agree = [a == b for ours, theirs in zip(cpp_run["greedy"], reference["greedy"]) for a, b in zip(ours, theirs)]
    assert sum(agree) >= 0.75 * len(agree), (cpp_run["greedy"], reference["greedy"])
