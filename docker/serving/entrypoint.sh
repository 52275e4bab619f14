#!/bin/sh
# Entry point of the churn serving image.
#   arguments:                                 run them (e.g. `churn models list`)
#   MLSERVER_MODELS_DIR set:                   `mlserver start $MLSERVER_MODELS_DIR` (a Seldon Core 2
#                                              MLServer server; model folders from `churn models
#                                              export` name serving.standalone.ChurnModel)
#   a manifest.json in /mnt/models:            `churn serve --model-dir /mnt/models` (a Seldon Core v1
#                                              predictor: its storage initializer downloads modelUri
#                                              there), unless CHURN_MODEL_DIR names another folder
#   otherwise:                                 `churn serve` on the registry in the data volume
# Seldon Core v1 ports (PREDICTIVE_UNIT_*_SERVICE_PORT) are honoured by both `churn serve` forms.
# CHURN_SELDON_MODELS_MOUNT replaces /mnt/models (Seldon's fixed mount; the tests use it).
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
models_mount="${CHURN_SELDON_MODELS_MOUNT:-/mnt/models}"
if [ -z "${CHURN_MODEL_DIR:-}" ] && [ -f "$models_mount/manifest.json" ]; then
  export CHURN_MODEL_DIR="$models_mount"
fi
if [ -n "${CHURN_MODEL_DIR:-}" ]; then
  exec churn serve --model-dir "$CHURN_MODEL_DIR"
fi
if [ -n "${PREDICTIVE_UNIT_HTTP_SERVICE_PORT:-}" ] && [ -d "$models_mount" ]; then
  echo "churn-entrypoint: Seldon mounted $models_mount but it holds no manifest.json;" \
    "upload the folder that \`churn models export\` writes to the predictor's modelUri" >&2
  exit 1
fi
exec churn serve
