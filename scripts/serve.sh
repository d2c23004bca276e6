#!/usr/bin/env bash
# Set everything up (cached) and serve SmolLM2-135M with the seqkv KV cache on 127.0.0.1.
# Extra arguments go to `vllm serve`, e.g. `bash scripts/serve.sh --kv-cache-backend auto`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
bash "$SEQKV_ROOT/scripts/setup.sh"
model="$("$SEQKV_VENV/bin/python" -c 'import seqkv_fixtures as fixtures; print(fixtures.smollm2_dir())')"
port="${PORT:-8000}"
# the default preset's calibration (fitted once, ~4 minutes on 2 cores; seconds when cached)
"$SEQKV_VENV/bin/python" -m vllm_seqkv.calibrate "$model" >&2
cat >&2 <<MSG
[seqkv] serving $model at http://127.0.0.1:$port/v1  (model name: smollm2)
[seqkv] try:  curl http://127.0.0.1:$port/v1/chat/completions -H 'Content-Type: application/json' \\
                -d '{"model": "smollm2", "messages": [{"role": "user", "content": "What is a Python list?"}], "max_tokens": 96, "temperature": 0.2, "top_p": 0.9}'
MSG
exec "$SEQKV_VENV/bin/vllm" serve "$model" --served-model-name smollm2 \
  --host 127.0.0.1 --port "$port" --dtype bfloat16 --max-model-len 4096 \
  --kv-cache-memory-bytes "${KV_CACHE_MEMORY_BYTES:-268435456}" \
  --kv-cache-backend seqkv "$@"
