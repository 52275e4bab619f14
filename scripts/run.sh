#!/usr/bin/env bash
# Installs everything, then runs the platform on its embedded defaults until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
exec .venv/bin/churn up "$@"
