"""One model version served from its own folder, without a registry around it: Seldon Core.

A *version folder* holds one registered version's artefacts, its ``manifest.json`` (names the
version and the SHA-256 of every artefact) and a ``model-settings.json`` for MLServer.
``churn models export`` writes it (:func:`export_version`); users upload it to
``s3://churn-models/<version>``, the ``modelUri`` / ``storageUri`` the Seldon renderers in
``churn_assets.deploy`` point at.

* **Seldon Core v1** (SeldonDeployment, ``protocol: v2``): the storage initializer downloads the
  folder to ``/mnt/models`` and the image's entry point runs ``churn serve --model-dir
  /mnt/models``. :func:`model_dir_overrides` stages the folder as a one-version registry whose
  champion it is, so the whole serving process (router, product endpoints, metrics) runs as usual.
* **Seldon Core 2** (``Model`` with ``requirements: [mlserver]``): the agent downloads the folder
  into the server's models directory and MLServer loads :class:`ChurnModel`, named by
  ``model-settings.json``. The agent rewrites that file's ``name`` and ``parameters.version`` (to
  ``churn-v3_1`` and ``1``, say) and keeps only the fields it knows, so the churn version is
  always read from ``manifest.json``, never from the model settings. The rendered ``Model``'s
  ``spec.parameters`` reach the runtime as ``parameters.extra``: ``arm`` names the rollout arm
  its answers belong to (``primary``, ``canary``, ``shadow``), as ``serving.arm`` does for a v1
  pod. Its answers are counted in ``predictions_total`` / ``prediction_latency_seconds`` (by
  churn version and arm) on the server's metrics endpoint and mirrored to ``ml.predictions``.

Every artefact is verified against its SHA-256 before it is used; nothing is unpickled.
TensorFlow and ``seldon_core`` are never imported here.
"""

import atexit
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import mlserver.grpc.utils as mlserver_grpc_utils
import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec, StringCodec
from mlserver.errors import MLServerError
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri

from churn_assets.broker import BrokerError, resolve_bootstrap
from churn_assets.config import Settings, load_settings
from churn_assets.model import ScoringModel
from churn_assets.registry import (
    MANIFEST,
    ModelRegistry,
    ModelVersion,
    RegistryError,
    read_verified,
    read_version_dir,
)
from serving.errors import InvalidInput
from serving.metrics import ServingMetrics
from serving.mirror import PredictionMirror, prediction_event_bytes
from serving.plane import MODEL_NAME, Prediction
from serving.runtime import batch_from_request, input_metadata

__all__ = [
    "MODEL_SETTINGS_FILE",
    "ChurnModel",
    "ModelFolderError",
    "export_version",
    "load_version_folder",
    "model_dir_overrides",
    "model_settings",
]

log = logging.getLogger(__name__)

MODEL_SETTINGS_FILE = "model-settings.json"
MODEL_DIR_STATE = "model-dir"  # under storage.data_dir: one serving state per served version

# Field-level validation errors are HTTP 422; MLServer maps 422 to gRPC FAILED_PRECONDITION,
# but for bad input the right gRPC code is INVALID_ARGUMENT (as in serving.server).
mlserver_grpc_utils.STATUS_CODE_MAPPING[422] = grpc.StatusCode.INVALID_ARGUMENT


class ModelFolderError(RegistryError):
    """A version folder cannot be exported or served as asked; the message says why."""


def model_settings(version: str) -> dict[str, Any]:
    """MLServer 1.7 ``model-settings.json`` of an exported version folder.

    ``name`` matches the Seldon Core 2 ``Model`` that ``render_seldon_v2`` names; ``uri`` is the
    folder itself (MLServer resolves it against the settings file's directory).
    """
    return {
        "name": f"churn-{version}",
        "implementation": f"{ChurnModel.__module__}.{ChurnModel.__qualname__}",
        "parameters": {"uri": "./", "version": version},
    }


def _verified_files(version: ModelVersion) -> dict[str, bytes]:
    return {name: read_verified(version, name) for name in sorted(version.files)}


def load_version_folder(folder: Path) -> ScoringModel:
    """The scoring model in a version folder, every artefact checked against its SHA-256."""
    version = read_version_dir(folder)
    return ScoringModel.from_files(_verified_files(version), version=version.version)


def export_version(registry: ModelRegistry, ref: str, dest: Path) -> Path:
    """Write version ``ref`` to ``dest/<version>/``: its artefacts (verified on the way out),
    ``manifest.json`` and ``model-settings.json``. Never overwrites; returns the folder."""
    version = registry.get(ref)
    target = Path(dest) / version.version
    if target.exists() or target.is_symlink():
        raise ModelFolderError(
            f"{target} already exists; refusing to overwrite it (remove it or export elsewhere)"
        )
    files = _verified_files(version)
    manifest = (version.path / MANIFEST).read_bytes()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{version.version}.", dir=target.parent))
    except OSError as exc:
        raise ModelFolderError(f"cannot export to {target}: {exc}") from exc
    try:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        (staging / MANIFEST).write_bytes(manifest)
        settings = json.dumps(model_settings(version.version), indent=2) + "\n"
        (staging / MODEL_SETTINGS_FILE).write_text(settings)
        _verified_files(read_version_dir(staging))
        staging.chmod(0o755)
        if target.exists():
            raise ModelFolderError(f"{target} appeared during the export; not replaced")
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def model_dir_overrides(
    settings: Settings, model_dir: Path, expected_version: str | None
) -> dict[str, dict[str, Any]]:
    """Settings sections that make ``churn serve`` serve exactly the version folder
    ``model_dir`` as champion.

    The folder's artefacts are verified and copied into a fresh one-version registry under
    ``<storage.data_dir>/model-dir/<version>/models`` (aliases ``champion=<version>``); the
    router state lives beside it, apart from the registry's own serving state. With the
    embedded broker, its current address is pinned so that predictions are still mirrored.
    ``expected_version`` (``$CHURN_MODEL_VERSION`` in a SeldonDeployment predictor) must be
    the version the manifest names.
    """
    version = read_version_dir(model_dir)
    if expected_version is not None and expected_version != version.version:
        raise ModelFolderError(
            f"{model_dir} holds model version {version.version} (its {MANIFEST}) but "
            f"CHURN_MODEL_VERSION is {expected_version!r}: the predictor's modelUri and its "
            "CHURN_MODEL_VERSION must name the same version"
        )
    files = _verified_files(version)
    files[MANIFEST] = (version.path / MANIFEST).read_bytes()
    state_dir = settings.data_dir / MODEL_DIR_STATE / version.version
    registry_root = state_dir / "models"
    try:
        shutil.rmtree(registry_root, ignore_errors=True)
        copy = registry_root / version.version
        copy.mkdir(parents=True)
        for name, data in files.items():
            (copy / name).write_bytes(data)
    except OSError as exc:
        raise ModelFolderError(
            f"cannot stage {model_dir} in {registry_root} (storage.data_dir must be writable): "
            f"{exc}"
        ) from exc
    ModelRegistry(registry_root).set_alias("champion", version.version)
    log.info("serving %s from %s (staged in %s)", version.version, model_dir, registry_root)

    overrides: dict[str, dict[str, Any]] = {
        "storage": {"data_dir": str(state_dir), "registry_dir": str(registry_root)}
    }
    if settings.kafka.uses_embedded_broker:
        try:
            overrides["kafka"] = {"bootstrap_servers": resolve_bootstrap(settings.run_dir)}
        except BrokerError as exc:
            log.warning("no embedded broker to mirror predictions to: %s", exc)
    return overrides


ARMS = ("primary", "canary", "shadow")


@dataclass(frozen=True)
class RuntimeEvidence:
    """What every :class:`ChurnModel` of one MLServer process shares: the churn metrics,
    registered in ``prometheus_client``'s default registry (the one MLServer's metrics endpoint
    serves with ``parallel_workers: 0``), and one mirror to ``ml.predictions``."""

    metrics: ServingMetrics
    mirror: PredictionMirror


_evidence_lock = threading.Lock()
_evidence: list[RuntimeEvidence] = []


def runtime_evidence() -> RuntimeEvidence:
    """The process's :class:`RuntimeEvidence`, made at the first model load from the platform
    settings (``CHURN_CONFIG``: its Kafka settings). Process-wide because MLServer loads every
    model of a server into one process and serves one Prometheus registry: two models each
    registering ``predictions_total`` there would clash."""
    with _evidence_lock:
        if not _evidence:
            from prometheus_client import REGISTRY

            metrics = ServingMetrics(REGISTRY)
            mirror = PredictionMirror(load_settings(), metrics)
            # MLServer gives no hook after the last model; at exit the queued events go out.
            atexit.register(mirror.close)
            _evidence.append(RuntimeEvidence(metrics, mirror))
        return _evidence[0]


def _arm(parameters: Any) -> str:
    """The rollout arm from the model settings' ``parameters.extra`` (default ``primary``)."""
    extra = getattr(parameters, "extra", None) or {}
    arm = extra.get("arm", "primary")
    if arm not in ARMS:
        raise ModelFolderError(f"model parameter arm={arm!r} is not one of {ARMS}")
    return str(arm)


class ChurnModel(MLModel):
    """MLServer runtime for one exported version folder (Seldon Core 2, ``mlserver start``).

    Inputs as for the ``churn`` models of ``churn serve`` (one input per feature of the version's
    contract, or a single ``records`` input of JSON objects), validated by the same rules; outputs
    ``probability`` and ``model_version`` (the churn version of the manifest).
    """

    async def load(self) -> bool:
        folder = Path(await get_model_uri(self.settings))
        self._scoring = load_version_folder(folder)
        if not self.settings.inputs:  # the metadata names the contract's inputs
            # Through MLModel's property setter, which also indexes the inputs.
            self.inputs = input_metadata(self._scoring.contract)
        self._arm = _arm(self.settings.parameters)
        self._evidence = runtime_evidence()
        metrics, version = self._evidence.metrics, self._scoring.version or ""
        # The series exist from the start, so Prometheus's increase() counts the first answers.
        self._ok = metrics.predictions_total.labels(version=version, arm=self._arm, status="ok")
        self._errors = metrics.predictions_total.labels(
            version=version, arm=self._arm, status="error"
        )
        self._latency = metrics.prediction_latency_seconds.labels(version=version, arm=self._arm)
        log.info("model %s serves churn %s (arm %s) from %s", self.name, version, self._arm, folder)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        try:
            requests = batch_from_request(payload, self._scoring.contract)
        except InvalidInput as exc:
            raise MLServerError(str(exc), exc.status_code) from None
        started = time.perf_counter()
        try:
            probabilities = self._scoring.predict_columns(requests.columns, len(requests))
        except Exception:
            self._errors.inc(len(requests))
            raise
        self._record(requests, probabilities, (time.perf_counter() - started) * 1000)
        return InferenceResponse(
            id=payload.id,
            model_name=self.name,
            model_version=self.version,
            outputs=[
                NumpyCodec.encode_output("probability", probabilities.astype(np.float64)),
                StringCodec.encode_output(
                    "model_version", [self._scoring.version or ""] * len(requests)
                ),
            ],
        )

    def _record(self, requests: Any, probabilities: np.ndarray, latency_ms: float) -> None:
        """Count and time the answers, and mirror each to ``ml.predictions`` (never blocking)."""
        self._ok.inc(len(requests))
        for _ in range(len(requests)):
            self._latency.observe(latency_ms / 1000)
        predicted_at = datetime.now(UTC)
        version = self._scoring.version or ""
        rows = zip(
            requests.request_ids,
            requests.customer_ids,
            probabilities,
            requests.features,
            strict=True,
        )
        for request_id, customer_id, probability, record in rows:
            prediction = Prediction(
                request_id=request_id or uuid.uuid4().hex,
                customer_id=customer_id,
                probability=float(probability),
                model_version=version,
                arm=self._arm,
                outlier_score=None,
                is_outlier=None,
                latency_ms=latency_ms,
            )
            self._evidence.mirror.publish_encoded(
                prediction.request_id,
                prediction_event_bytes(prediction, record, predicted_at, MODEL_NAME),
            )
