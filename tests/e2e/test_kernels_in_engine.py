"""The backend writes and reads its pages through the Triton write and reconstruction kernels
inside a real vLLM engine (interpreted on CPU: ``SEQKV_KERNELS=triton TRITON_INTERPRET=1``).

``SEQKV_KERNELS_CHECK=1`` compares every kernel call with the reference on the engine's own
pages and tokens (the engine stops beyond 1e-3 of reconstruction error, or 1e-2 of written
bytes differing from the codec's encode). End results are compared loosely on purpose: a
float32-rounding difference in a reconstruction (~1e-6) moves the next layer's K/V across
some quantizer thresholds when they are coded, so logprobs differ by up to ~0.05 between two
correct paths (measured: perplexity 26.941 vs 26.954 over 300 tokens).

Each engine runs in its own interpreter, so that ``TRITON_INTERPRET`` is set before any
kernel module is decorated.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROGRAM = """
import json, sys
sys.path.insert(0, sys.argv[1])
from tests.e2e.engines import engine, greedy, prompt_logprobs
prompt = json.loads(sys.argv[3])
with engine(sys.argv[2], max_model_len=512) as llm:
    lps = prompt_logprobs(llm, prompt)[0]
    toks = greedy(llm, [prompt], max_tokens=6)[0]
print("RESULT " + json.dumps({"logprobs": lps, "greedy": toks}))
"""


def run_engine(model_dir, prompt, kernels: str) -> tuple[dict, str]:
    env = {**os.environ, "SEQKV_KERNELS": kernels, "SEQKV_KERNELS_CHECK": "1",
           "VLLM_LOGGING_LEVEL": "INFO"}
    env.pop("TRITON_INTERPRET", None)
    if kernels == "triton":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", PROGRAM, str(ROOT), str(model_dir), json.dumps(prompt)],
                          env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), log


@pytest.mark.e2e
def test_triton_write_and_reconstruction_in_the_engine_match_the_torch_path(tiny_model_dir, test_text):
    pytest.importorskip("triton")
    from transformers import AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(tiny_model_dir)(test_text[:20_000])["input_ids"][:300]
    reference, ref_log = run_engine(tiny_model_dir, prompt, "torch")
    triton_run, log = run_engine(tiny_model_dir, prompt, "triton")
    assert "seqkv kernels: triton implementation on cpu" in log
    assert "seqkv kernels: torch implementation on cpu" in ref_log
    errors = [float(e) for e in re.findall(r"worst error vs reference so far (\S+)", log)]
    assert errors and max(errors) < 1e-4, errors  # layers 1-3 checked on every call
    differ = [float(e) for e in re.findall(r"written bytes differing from the reference so far (\S+)", log)]
    assert differ and max(differ) < 1e-3, differ  # threshold flips only (measured: none)

    def ppl(lps):
        return math.exp(-sum(lps) / len(lps))

    assert abs(ppl(triton_run["logprobs"]) / ppl(reference["logprobs"]) - 1) < 0.01
