#!/bin/sh
# Entry point of the churn serving image.
#   no arguments, MLSERVER_MODELS_DIR unset: `churn serve` (Seldon Core v1 ports honoured)
#   no arguments, MLSERVER_MODELS_DIR set:   `mlserver start $MLSERVER_MODELS_DIR` (Seldon Core 2)
#   arguments:                               run them (e.g. `churn models list`)
set -eu

if [ -n "${PREDICTIVE_UNIT_HTTP_SERVICE_PORT:-}" ]; then
  export CHURN_SERVING__HTTP_PORT="$PREDICTIVE_UNIT_HTTP_SERVICE_PORT"
fi
if [ -n "${PREDICTIVE_UNIT_GRPC_SERVICE_PORT:-}" ]; then
  export CHURN_SERVING__GRPC_PORT="$PREDICTIVE_UNIT_GRPC_SERVICE_PORT"
fi

if [ "$#" -gt 0 ]; then
  exec "$@"
fi
if [ -n "${MLSERVER_MODELS_DIR:-}" ]; then
  exec mlserver start "$MLSERVER_MODELS_DIR"
fi
exec churn serve
