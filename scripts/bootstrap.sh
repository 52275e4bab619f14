#!/usr/bin/env bash
# Installs what the platform and its tests need, idempotently: uv, a Python 3.12 virtual
# environment in .venv with the locked packages. Quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[bootstrap] %s\n' "$*" >&2; }

find_uv() {
  if command -v uv >/dev/null 2>&1; then
    command -v uv
    return
  fi
  local candidate
  for candidate in "$HOME/.local/bin/uv" "$HOME/.cargo/bin/uv"; do
    [ -x "$candidate" ] && { echo "$candidate"; return; }
  done
  return 1
}

UV=$(find_uv || true)
if [ -z "$UV" ]; then
  log "uv not found; installing it with pip"
  PIP_PY=$(command -v python3 || command -v python)
  "$PIP_PY" -m pip install --quiet --user uv || "$PIP_PY" -m pip install --quiet uv
  UV=$(find_uv || true)
  if [ -z "$UV" ]; then
    UV="$PIP_PY -m uv"
  fi
fi

# Python 3.12: prefer a pyenv-installed interpreter (uv cannot download one on machines without
# internet access to python-build-standalone); otherwise let uv find or fetch 3.12 itself.
PYTHON_ARG="3.12"
PYENV_ROOT_DIR=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
for candidate in $(ls -d "$PYENV_ROOT_DIR"/versions/3.12.*/bin/python3.12 2>/dev/null | sort -V -r); do
  if [ -x "$candidate" ]; then
    PYTHON_ARG="$candidate"
    break
  fi
done

log "syncing .venv with uv.lock (python: $PYTHON_ARG)"
$UV sync --frozen --python "$PYTHON_ARG" --quiet
log "environment ready: $(.venv/bin/python --version)"
