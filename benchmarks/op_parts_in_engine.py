"""Where the C++ CPU ops' time goes inside a serving engine: the decode and engine-write ops of
every layer split into what runs before the kernel (argument checks, layer tables, conversions),
the kernel and what runs after it, next to the attention layer's time per call.

A copy of the tree is built with ``-DSEQKV_TIME_OP_PARTS`` (``csrc/cpu/transform_cpu_ops.cpp``:
the ops add up their parts and print the means per call at exit; never in a normal build), then an
in-process eager engine (SmolLM2, seqkv-f4, one sequence) generates ``--tokens`` tokens after a
``--context``-token prompt, three times; the parts are means over the process's calls (the
write's of up to 8 tokens: decode steps, not the prefill), the attention layer time the median of
the decode steps' calls.

    python -m benchmarks.op_parts_in_engine --contexts 64,4096 --repeats 3   # writes benchmarks/op_parts_in_engine.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.cpu_decode import machine, uptime
from benchmarks.cpu_decode_ablation import build_variant

ROOT = Path(__file__).resolve().parents[1]

CHILD = r'''
import os, statistics, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
context, new = int(sys.argv[1]), int(sys.argv[2])
from benchmarks.decode_step_parts import _prompt_ids, _time_attention_layers
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
import seqkv_fixtures as fixtures
import vllm_seqkv
assert os.environ["SEQKV_VARIANT_ROOT"] in vllm_seqkv.__file__, vllm_seqkv.__file__
timed = {}
_time_attention_layers(timed)
llm = LLM(model=str(fixtures.smollm2_dir()), max_model_len=context + new + 64, kv_cache_memory_bytes=256 << 20,
          additional_config={"kv_cache_backend": "seqkv", "seqkv": {"preset": "seqkv-f4"}}, seed=0, enforce_eager=True)
prompt = TokensPrompt(prompt_token_ids=_prompt_ids(context))
params = SamplingParams(max_tokens=1 + new, min_tokens=1 + new, temperature=0, ignore_eos=True)
medians = []
for _ in range(3):
    timed.clear()
    llm.generate([prompt], params, use_tqdm=False)
    medians.append(statistics.median(timed["attention layer"][30 * 2:]))  # after the prefill's and first step's layers
print("ATTENTION_LAYER_US", statistics.median(medians) * 1e6, flush=True)
'''


def run_context(root: Path, context: int, tokens: int) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               SEQKV_VARIANT_ROOT=str(root))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(context), str(tokens)], cwd=root, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"engine run failed at context {context}:\n{proc.stderr[-3000:]}")
    row = {"context": context, "tokens": tokens, "uptime_at_end": uptime(), "ops": {}}
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith("ATTENTION_LAYER_US"):
            row["attention_layer_us"] = round(float(line.split()[1]), 1)
        elif line.startswith("SEQKV_OP_PARTS "):
            parts = json.loads(line[len("SEQKV_OP_PARTS "):])
            row["ops"][parts.pop("op")] = parts
    if not row["ops"]:
        raise RuntimeError("the instrumented build printed no op parts")
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", default="64,4096")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="engine processes per context (alternating contexts)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "op_parts_in_engine.json"))
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="seqkv-op-parts-") as tmp:
        root = build_variant("op_parts", Path(tmp), flags="-DSEQKV_TIME_OP_PARTS")
        for _, context in ((r, int(c)) for r in range(args.repeats) for c in args.contexts.split(",")):
            rows.append(run_context(root, context, args.tokens))
            ops = rows[-1]["ops"]
            print(f"context {context}: attention layer {rows[-1].get('attention_layer_us')} us; "
                  + "; ".join(f"{name} {p['entry_us']:.1f} / {p['kernel_us']:.1f} / {p['exit_us']:.1f} us"
                              for name, p in ops.items()))
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python -m benchmarks.op_parts_in_engine " + " ".join(argv or sys.argv[1:]),
              "machine": machine(), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
