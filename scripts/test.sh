#!/usr/bin/env bash
# Installs everything, then runs the whole test suite (unit and integration).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
exec .venv/bin/python -m pytest "$@"
