#!/usr/bin/env bash
# The one GPU check, for a lent GPU machine (H200; no internet; system python with CUDA torch,
# triton and nvcc; no vLLM; our venv is not there). Budget: < 8 minutes end to end.
#   1. builds csrc/ as vllm_seqkv._C (in place);
#   2. runs tests/kernels on the GPU (Triton + CUDA ops vs the torch reference, opcheck; both
#      slot formats: seqkv-3-rot and the transform presets; and the attention backend's data
#      path, EngineCodec, with pages in GPU memory: test_engine_codec_on_device.py);
#   3. benchmarks decode attention vs bf16 SDPA -> benchmarks/gpu_decode.json: the fused
#      seqkv-3-rot kernel and, for the transform format, reconstruct_transform_blocks + SDPA
#      and the fused transform kernel on the same cases, plus the transform CUDA op on the
#      smaller ones when the build succeeded (after a kernel-vs-codec correctness gate for each).
# Every step's timeout comes from one deadline (DEADLINE_S, default 465 s after start), so the
# script ends within 8 minutes; the benchmark starts no case past its share and records what
# it measured. Usage: bash scripts/gpu_check.sh        (PYTHON=... to pick the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
status=0
DEADLINE_S=${DEADLINE_S:-465}
left() { local r=$((DEADLINE_S - SECONDS - $1)); [ "$r" -gt 10 ] && echo "$r" || echo 10; }
step() { echo; echo "=== $* ($(date +%T))"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name())" || exit 1

step "build csrc (vllm_seqkv._C)"
arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
if TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=16 timeout "$(left 300)" $PY setup.py build_ext --inplace > /tmp/seqkv_build.log 2>&1; then
  tail -3 /tmp/seqkv_build.log
  $PY -c "import vllm_seqkv._C, torch; print('ops:', torch.ops.seqkv.paged_decode_attention, torch.ops.seqkv.write_slots, torch.ops.seqkv.write_transform_slots, torch.ops.seqkv.transform_decode_attention)" || status=1
else
  echo "csrc build FAILED (Triton path still tested):"; tail -40 /tmp/seqkv_build.log; status=1
fi

step "tests/kernels on GPU"
if $PY -c "import pytest" 2>/dev/null; then
  # the nvcc compile-only test is redundant here (the build above compiled everything), and so
  # is the g++ host test of the transform ops' math (test_cuda_ops.py runs the ops themselves)
  timeout "$(left 150)" $PY -m pytest tests/kernels -q -p no:cacheprovider -o addopts="" \
    --deselect tests/kernels/test_csrc_compiles.py::test_every_csrc_source_compiles \
    --ignore tests/kernels/test_transform_host.py || status=1
else
  echo "pytest is not installed: tests skipped (the benchmark still checks correctness)"; status=1
fi

step "benchmark decode attention"
budget=$(left 75)
timeout "$(left 5)" $PY -m benchmarks.gpu_kernels --out benchmarks/gpu_decode.json --budget-s "$budget" || status=1

step "done: status $status (${SECONDS}s)"
exit $status
