#!/usr/bin/env bash
# The test command (README + CI): set up (cached, seconds when nothing changed), then pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not e2e"`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
bash "$SEQKV_ROOT/scripts/setup.sh"
cd "$SEQKV_ROOT"
"$SEQKV_VENV/bin/ruff" check vllm_seqkv seqkv_fixtures tests benchmarks examples scripts
# Kernel tests run in their own process with TRITON_INTERPRET=1 set from the start: in a
# process where vLLM already imported Triton without it, the interpreter cannot take over.
if [ "$#" -eq 0 ]; then
  "$SEQKV_VENV/bin/python" -m pytest --ignore=tests/kernels
  exec env TRITON_INTERPRET=1 "$SEQKV_VENV/bin/python" -m pytest tests/kernels
fi
exec "$SEQKV_VENV/bin/python" -m pytest "$@"
