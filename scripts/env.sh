# Sourced by the other scripts: where the cached venv, model and corpus live, and the
# environment every vLLM run needs on our offline machines.
SEQKV_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# the repo's dev packages (benchmarks, seqkv_fixtures) are not installed: import them from here
export PYTHONPATH="$SEQKV_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export SEQKV_HOME="${SEQKV_HOME:-$HOME/.cache/vllm-seqkv}"
req_hash="$(cat "$SEQKV_ROOT"/requirements/*.txt | sha256sum | cut -c1-12)"
export SEQKV_VENV="${SEQKV_VENV:-$SEQKV_HOME/venv-$req_hash}"
export SEQKV_MODELS="$SEQKV_HOME/models"
export SEQKV_DATA="$SEQKV_HOME/data"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export VLLM_HOST_IP="${VLLM_HOST_IP:-127.0.0.1}"
export TOKENIZERS_PARALLELISM=false
