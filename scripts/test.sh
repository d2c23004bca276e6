#!/usr/bin/env bash
# The test command (README + CI): set up (cached, seconds when nothing changed), then pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not e2e"`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
bash "$SEQKV_ROOT/scripts/setup.sh"
cd "$SEQKV_ROOT"
exec "$SEQKV_VENV/bin/python" -m pytest "$@"
