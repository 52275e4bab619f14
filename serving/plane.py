"""The transport-neutral serving data plane: validation, routing, scoring, shadowing, mirroring,
explanations and router administration. REST, gRPC (through MLServer) and the product's
convenience endpoints only translate to and from it.
"""

import asyncio
import functools
import logging
import statistics
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from churn_assets.config import Settings
from churn_assets.model import ScoringModel, load_model
from churn_assets.registry import ModelRegistry, RegistryError
from churn_assets.schemas import FEATURE_NAMES, CustomerFeatures, Identifier, PredictionEvent
from serving.errors import InvalidInput, NotFound, ServingError, Unavailable
from serving.metrics import ServingMetrics
from serving.router import (
    RouterError,
    RouterState,
    RouterStore,
    promote,
    reconcile,
    rollback,
    route,
)

__all__ = [
    "MAX_BATCH",
    "Prediction",
    "PredictRequest",
    "ServingPlane",
    "validate_records",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_BATCH = 1000
MODEL_NAME = "churn"


class PredictRequest(CustomerFeatures):
    """One record to score: the eight features, an optional customer and request id.

    Unknown fields, NaN/inf, out-of-range values and unknown categories are rejected.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    customer_id: Identifier | None = None
    request_id: Identifier | None = None


def _batch_size(value: Any) -> Any:
    """The batch limit, checked before any record is validated."""
    if isinstance(value, list) and len(value) > MAX_BATCH:
        raise ValueError(f"at most {MAX_BATCH} records per request, got {len(value)}")
    return value


class BatchPredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instances: Annotated[
        list[PredictRequest],
        BeforeValidator(_batch_size),
        Field(min_length=1, max_length=MAX_BATCH),
    ]


def validate_records(rows: Sequence[Mapping[str, Any]]) -> list[PredictRequest]:
    """Validate raw rows; raises :class:`InvalidInput` with every field error, row-indexed."""
    if not rows:
        raise InvalidInput([{"loc": ["instances"], "msg": "at least one record is required"}])
    if len(rows) > MAX_BATCH:
        raise InvalidInput(
            [
                {
                    "loc": ["instances"],
                    "msg": f"at most {MAX_BATCH} records per request, got {len(rows)}",
                }
            ]
        )
    valid, errors = [], []
    for index, row in enumerate(rows):
        try:
            valid.append(PredictRequest.model_validate(row))
        except ValidationError as exc:
            for error in exc.errors():
                errors.append(
                    {"loc": [index, *error["loc"]], "msg": error["msg"], "type": error["type"]}
                )
    if errors:
        raise InvalidInput(errors)
    return valid


def _one_change_at_a_time(method: Callable[..., RouterState]) -> Callable[..., RouterState]:
    """Run a router change under the plane's admin lock."""

    @functools.wraps(method)
    def serialized(self: "ServingPlane", *args: Any, **kwargs: Any) -> RouterState:
        with self._admin_lock:
            return method(self, *args, **kwargs)

    return serialized


@dataclass(frozen=True)
class Prediction:
    request_id: str
    customer_id: str | None
    probability: float
    model_version: str
    arm: str
    outlier_score: float | None
    is_outlier: bool | None
    latency_ms: float

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass
class _Loaded:
    model: ScoringModel
    threshold: float
    outliers: Any | None = None
    explainer: Any | None = None


class ServingPlane:
    """Everything a request needs, shared by all transports in one process."""

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: ServingMetrics | None = None,
        mirror: Any | None = None,
        store: RouterStore | None = None,
    ) -> None:
        self.settings = settings
        self.registry = ModelRegistry(settings.registry_dir)
        self.metrics = metrics or ServingMetrics()
        self.mirror = mirror
        self.store = store or RouterStore(settings.data_dir / "serving")
        self._models: dict[str, _Loaded] = {}
        self._lock = threading.RLock()
        # Router changes (policy, promote, rollback) run in worker threads: one at a time, each
        # computed from the state the previous one left.
        self._admin_lock = threading.Lock()
        self.quarantined: dict[str, str] = {}
        self._shadow_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shadow")
        # Requests are scored on one thread of their own and explained on another, never on
        # the event loop: one scoring at a time uses the cores best (XGBoost and NumPy spread
        # a batch over them; scorings side by side only fight for them), and a long SHAP
        # explanation never delays a prediction.
        self._scoring = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scoring")
        self._explaining = ThreadPoolExecutor(max_workers=1, thread_name_prefix="explaining")
        self._shadow_pairs: deque[dict[str, Any]] = deque(maxlen=20_000)
        self._latencies: dict[tuple[str, str], deque[float]] = {}
        self._counts: dict[tuple[str, str, str], int] = {}
        self._anchors: Any | None = None
        from serving.monitoring import MonitoringFeed

        self.monitoring = MonitoringFeed(settings.read_models_dir, self.metrics)
        self.state = self._initial_state()
        self._publish_weights()

    # -- state ----------------------------------------------------------------------------------
    def _initial_state(self) -> RouterState:
        stored = self.store.load()
        if stored is not None:
            return self._restored_state(stored)
        aliases = self.registry.aliases()
        champion = aliases.get("champion")
        if champion is None:
            raise ServingError(
                "no champion model in the registry "
                f"({self.settings.registry_dir}); run the Dagster training_job first",
                503,
            )
        state = RouterState(
            strategy=self.settings.router.strategy,
            champion=champion,
            challenger=aliases.get("challenger"),
            canary_weight=self.settings.router.canary_weight,
        ).validate()
        for version in (state.champion, state.challenger):
            if version:
                self._get(version)
        return self.store.save(state, action="init", actor="system", detail={})

    def _restored_state(self, stored: RouterState) -> RouterState:
        """The stored state, reconciled with the registry's aliases (see :func:`reconcile`): a
        rollout resumes where it was unless the registry moved on while serving was down."""
        aliases = self.registry.aliases()
        state, changes = reconcile(stored, aliases.get("champion"), aliases.get("challenger"))
        if "champion" not in aliases:
            log.warning("the registry has no champion alias; serving the stored router state")
        for version in (state.champion, state.challenger):
            if version:
                self._get(version)
        if not changes:
            log.info("router state restored: %s", stored)
            return stored
        log.info(
            "router state restored and reconciled with the registry aliases: %s; now %s",
            "; ".join(changes),
            state,
        )
        return self.store.save(
            state,
            action="reconcile",
            actor="system",
            detail={
                "changes": list(changes),
                "registry": {alias: aliases.get(alias) for alias in ("champion", "challenger")},
                "stored": {
                    "strategy": stored.strategy,
                    "champion": stored.champion,
                    "challenger": stored.challenger,
                    "canary_weight": stored.canary_weight,
                    "previous_champions": list(stored.previous_champions),
                },
            },
        )

    def load(self, version: str) -> None:
        """Load ``version`` now (artefacts verified) unless it is loaded already;
        :class:`NotFound` says why it cannot be."""
        self._get(version)

    def _get(self, version: str) -> _Loaded:
        with self._lock:
            loaded = self._models.get(version)
            if loaded is None:
                try:
                    model = load_model(self.registry, version)
                except RegistryError as exc:
                    raise NotFound(f"model version {version!r} cannot be loaded: {exc}") from exc
                threshold = float(
                    self.registry.get(version)
                    .metadata.get("metrics", {})
                    .get("test_threshold", 0.5)
                )
                loaded = _Loaded(
                    model=model, threshold=threshold, outliers=self._outlier_scorer(model)
                )
                self._models[version] = loaded
            return loaded

    def quarantine(self, version: str, reason: str) -> None:
        """Leave ``version`` out of serving because it cannot be loaded; it is logged, kept in
        :attr:`quarantined` (``/router/metrics``) and counted in ``model_quarantined``."""
        log.warning("version %s quarantined (not served): %s", version, reason)
        with self._lock:
            self.quarantined[version] = reason
        self.metrics.model_quarantined.labels(version=version).set(1)

    @staticmethod
    def _outlier_scorer(model: ScoringModel) -> Any | None:
        """Versions registered with reference artefacts get request-path outlier scores."""
        from churn_assets.outliers import load_outlier_scorer

        files = getattr(model, "extra_files", None) or {}
        if not files:
            return None
        return load_outlier_scorer(model.transformer, files)

    def _publish_weights(self) -> None:
        weights = self.state.weights()
        for version in {self.state.champion, self.state.challenger} - {None}:
            share = weights.get(version, 0.0)
            arm = "primary" if version == self.state.champion else "canary"
            self.metrics.router_weight.labels(version=version, arm=arm).set(share)

    # -- off the event loop ---------------------------------------------------------------------
    async def scored(self, work: Callable[[], T]) -> T:
        """``work()`` (validation, scoring) on the scoring thread, awaited."""
        return await asyncio.get_running_loop().run_in_executor(self._scoring, work)

    async def explained(self, work: Callable[[], T]) -> T:
        """``work()`` (SHAP) on the explanation thread, awaited."""
        return await asyncio.get_running_loop().run_in_executor(self._explaining, work)

    # -- scoring --------------------------------------------------------------------------------
    def predict(self, rows: Sequence[Mapping[str, Any]]) -> list[Prediction]:
        """Validate, route, score and mirror a batch of records."""
        requests = validate_records(rows)
        started = time.perf_counter()
        state = self.state
        routes = [route(state, r.customer_id or r.request_id or uuid.uuid4().hex) for r in requests]
        by_version: dict[str, list[int]] = {}
        for index, target in enumerate(routes):
            by_version.setdefault(target.primary, []).append(index)
        records = [r.model_dump(include=set(FEATURE_NAMES)) for r in requests]
        results: list[Prediction | None] = [None] * len(requests)
        pending = list(by_version.items())
        while pending:
            version, indices = pending.pop(0)
            try:
                loaded = self._get(version)
                x = loaded.model.transformer.transform_records([records[i] for i in indices])
                probabilities = loaded.model.predict_matrix(x)
            except Exception:
                self._count_errors(version, [routes[i].arm for i in indices])
                if version == state.champion:
                    raise
                # A failing canary never fails its callers: the champion answers them, and
                # the errors count against the challenger (the rollout's canary gate).
                log.exception(
                    "canary %s failed on %d rows; the champion answers", version, len(indices)
                )
                for i in indices:
                    routes[i] = replace(routes[i], primary=state.champion, arm="primary")
                pending.append((state.champion, indices))
                continue
            scores, flags = self._outliers(loaded, x, version)
            elapsed_ms = (time.perf_counter() - started) * 1000
            for position, i in enumerate(indices):
                results[i] = Prediction(
                    request_id=requests[i].request_id or uuid.uuid4().hex,
                    customer_id=requests[i].customer_id,
                    probability=float(probabilities[position]),
                    model_version=version,
                    arm=routes[i].arm,
                    outlier_score=None if scores is None else float(scores[position]),
                    is_outlier=None if flags is None else bool(flags[position]),
                    latency_ms=elapsed_ms,
                )
        predictions = [p for p in results if p is not None]
        for prediction, request in zip(predictions, requests, strict=True):
            self._record(prediction, request)
        shadows = {s for target in routes for s in target.shadows}
        if shadows:
            self._shadow_pool.submit(self._score_shadows, shadows, requests, predictions)
        return predictions

    def _count_errors(self, version: str, arms: Sequence[str]) -> None:
        """Failed scorings, in Prometheus and in the counters the rollout reads."""
        with self._lock:
            for arm in arms:
                self.metrics.predictions_total.labels(
                    version=version, arm=arm, status="error"
                ).inc()
                key = (version, arm, "error")
                self._counts[key] = self._counts.get(key, 0) + 1

    def _outliers(self, loaded: _Loaded, x: np.ndarray, version: str):
        if loaded.outliers is None or not self.settings.monitoring.outlier_detection.enabled:
            return None, None
        scores, flags = loaded.outliers.score_mahalanobis(x)
        detected = int(np.sum(flags))
        if detected:
            self.metrics.outliers_detected_total.labels(
                version=version, detector="mahalanobis"
            ).inc(detected)
        return scores, flags

    def _record(self, prediction: Prediction, request: PredictRequest) -> None:
        key = (prediction.model_version, prediction.arm)
        self.metrics.predictions_total.labels(
            version=prediction.model_version, arm=prediction.arm, status="ok"
        ).inc()
        self.metrics.prediction_latency_seconds.labels(
            version=prediction.model_version, arm=prediction.arm
        ).observe(prediction.latency_ms / 1000)
        with self._lock:
            self._latencies.setdefault(key, deque(maxlen=5000)).append(prediction.latency_ms)
            count_key = (*key, "ok")
            self._counts[count_key] = self._counts.get(count_key, 0) + 1
        self._mirror(prediction, request)

    def _mirror(self, prediction: Prediction, request: PredictRequest) -> None:
        if self.mirror is None:
            return
        self.mirror.publish(
            PredictionEvent(
                request_id=prediction.request_id,
                customer_id=prediction.customer_id,
                model_name=MODEL_NAME,
                model_version=prediction.model_version,
                arm=prediction.arm,
                score=prediction.probability,
                latency_ms=prediction.latency_ms,
                status="ok",
                features=CustomerFeatures.model_validate(
                    request.model_dump(include=set(FEATURE_NAMES))
                ),
                predicted_at=datetime.now(UTC),
            )
        )

    def _score_shadows(
        self, versions: set[str], requests: list[PredictRequest], primaries: list[Prediction]
    ) -> None:
        """Off the request path: score the shadow versions, record pairs, mirror them."""
        records = [r.model_dump(include=set(FEATURE_NAMES)) for r in requests]
        for version in versions:
            try:
                loaded = self._get(version)
                started = time.perf_counter()
                x = loaded.model.transformer.transform_records(records)
                probabilities = loaded.model.predict_matrix(x)
                elapsed_ms = (time.perf_counter() - started) * 1000
                threshold = self._get(self.state.champion).threshold
                for request, primary, p in zip(requests, primaries, probabilities, strict=True):
                    shadow = replace(
                        primary,
                        probability=float(p),
                        model_version=version,
                        arm="shadow",
                        latency_ms=elapsed_ms,
                        outlier_score=None,
                        is_outlier=None,
                    )
                    self._shadow_pairs.append(
                        {
                            "primary_version": primary.model_version,
                            "shadow_version": version,
                            "primary": primary.probability,
                            "shadow": float(p),
                            "agree": (primary.probability >= threshold) == (p >= threshold),
                            "primary_latency_ms": primary.latency_ms,
                            "shadow_latency_ms": elapsed_ms,
                        }
                    )
                    self._record(shadow, request)
            except Exception:  # shadow failures never reach callers; they are counted
                log.exception("shadow scoring of %s failed", version)
                self._count_errors(version, ["shadow"] * len(requests))

    def predict_version(self, version: str, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Score with one version directly (the per-version V2 models); no routing, no mirror."""
        requests = validate_records(rows)
        loaded = self._get(version)
        records = [r.model_dump(include=set(FEATURE_NAMES)) for r in requests]
        return loaded.model.predict_records(records)

    def drain_shadows(self, timeout_s: float = 10.0) -> None:
        """Wait for queued shadow work (tests, shutdown)."""
        self._shadow_pool.submit(lambda: None).result(timeout=timeout_s)

    # -- explanations ---------------------------------------------------------------------------
    def explain(self, row: Mapping[str, Any], *, version: str | None = None, top_k: int = 5):
        request = validate_records([row])[0]
        target = version or route(self.state, request.customer_id or uuid.uuid4().hex).primary
        loaded = self._get(target)
        with self._lock:
            if loaded.explainer is None:
                from churn_assets.explain import ShapExplainer

                loaded.explainer = ShapExplainer(loaded.model)
        explanation = loaded.explainer.explain_records(
            [request.model_dump(include=set(FEATURE_NAMES))]
        )[0]
        return {**explanation.as_dict(top_k), "model_version": target, "method": "shap"}

    async def explain_anchors(
        self, row: Mapping[str, Any], *, version: str | None = None
    ) -> dict[str, Any]:
        """Alibi AnchorTabular rule for the record, computed in a separate process."""
        from churn_assets.outliers import REFERENCE_FILE

        request = validate_records([row])[0]
        target = version or route(self.state, request.customer_id or uuid.uuid4().hex).primary
        loaded = self._get(target)
        files = loaded.model.to_files()
        if REFERENCE_FILE not in files:
            raise ServingError(f"{target} has no reference sample to fit anchors on", 409)
        if self._anchors is None:
            from serving.anchors import AnchorService

            self._anchors = AnchorService(seed=self.settings.training.seed)
        return await self._anchors.explain(
            target,
            files,
            request.model_dump(include=set(FEATURE_NAMES)),
            decision=loaded.threshold,
        )

    # -- administration -------------------------------------------------------------------------
    def _change(self, new_state: RouterState, action: str, actor: str, **detail: Any):
        for version in (new_state.champion, new_state.challenger):
            if version:
                self._get(version)
        # The registry first: a crash between the two leaves the registry ahead of the saved
        # router state, which the next start reconciles as the change it was (a promotion
        # recorded the other way round would read as a rollback made in the registry).
        self._sync_registry_aliases(new_state)
        with self._lock:
            self.state = self.store.save(new_state, action=action, actor=actor, detail=detail)
            self._publish_weights()
        log.info("router %s by %s: %s", action, actor, self.state)
        return self.state

    def _sync_registry_aliases(self, state: RouterState) -> None:
        try:
            aliases = self.registry.aliases()
            if aliases.get("champion") != state.champion:
                self.registry.set_alias("champion", state.champion)
            if state.challenger and aliases.get("challenger") != state.challenger:
                self.registry.set_alias("challenger", state.challenger)
            if not state.challenger and "challenger" in self.registry.aliases():
                self.registry.clear_alias("challenger")
        except RegistryError as exc:
            raise Unavailable(
                f"the registry aliases could not be changed, so the router was not: {exc}"
            ) from exc

    @_one_change_at_a_time
    def set_policy(
        self,
        *,
        strategy: str | None,
        canary_weight: float | None,
        challenger: str | None,
        actor: str,
        remove_challenger: bool = False,
    ) -> RouterState:
        if remove_challenger and challenger:
            raise InvalidInput(
                [
                    {
                        "loc": ["body"],
                        "msg": "give either a challenger or remove_challenger, not both",
                    }
                ]
            )
        try:
            new_state = replace(
                self.state,
                strategy=strategy or self.state.strategy,
                canary_weight=self.state.canary_weight if canary_weight is None else canary_weight,
                challenger=None if remove_challenger else challenger or self.state.challenger,
            ).validate()
        except RouterError as exc:
            raise InvalidInput([{"loc": ["body"], "msg": str(exc)}]) from exc
        return self._change(
            new_state,
            "set_policy",
            actor,
            strategy=new_state.strategy,
            canary_weight=new_state.canary_weight,
            challenger=new_state.challenger,
        )

    @_one_change_at_a_time
    def promote(self, actor: str) -> RouterState:
        try:
            new_state = promote(self.state)
        except RouterError as exc:
            raise ServingError(str(exc), 409) from exc
        return self._change(new_state, "promote", actor)

    @_one_change_at_a_time
    def rollback(self, actor: str) -> RouterState:
        try:
            new_state = rollback(self.state)
        except RouterError as exc:
            raise ServingError(str(exc), 409) from exc
        return self._change(new_state, "rollback", actor)

    # -- reports --------------------------------------------------------------------------------
    def router_metrics(self) -> dict[str, Any]:
        with self._lock:
            latency = {
                f"{version}/{arm}": _percentiles(values)
                for (version, arm), values in self._latencies.items()
            }
            counts = {f"{v}/{a}/{s}": n for (v, a, s), n in self._counts.items()}
        return {
            "state": self.state.__dict__
            | {"previous_champions": list(self.state.previous_champions)},
            "weights": self.state.weights(),
            "requests": counts,
            "latency_ms": latency,
            "mirror": {
                "delivered": getattr(self.mirror, "delivered", 0),
                "dropped": getattr(self.mirror, "dropped", 0),
            },
            "quarantined": dict(self.quarantined),
        }

    def shadow_analysis(self, version: str | None = None) -> dict[str, Any]:
        """Primary-vs-shadow comparison over the recent pairs (all, or where ``version``
        shadowed), with the shadow scorings that failed since the process started."""
        pairs = list(self._shadow_pairs)
        with self._lock:
            errors = sum(
                n
                for (v, arm, status), n in self._counts.items()
                if arm == "shadow" and status == "error" and version in (None, v)
            )
        if version is not None:
            pairs = [p for p in pairs if p["shadow_version"] == version]
        if not pairs:
            return {
                "pairs": 0,
                "errors": errors,
                "message": "no shadow traffic yet (strategy must be 'shadow' "
                "with a challenger loaded)" + (f" for {version}" if version is not None else ""),
            }
        primary = np.array([p["primary"] for p in pairs])
        shadow = np.array([p["shadow"] for p in pairs])
        from scipy.stats import ks_2samp

        ks = ks_2samp(primary, shadow)
        return {
            "pairs": len(pairs),
            "errors": errors,
            "primary_version": pairs[-1]["primary_version"],
            "shadow_version": pairs[-1]["shadow_version"],
            "agreement_rate": float(np.mean([p["agree"] for p in pairs])),
            "latency_overhead_ms": float(
                np.mean([p["shadow_latency_ms"] - p["primary_latency_ms"] for p in pairs])
            ),
            "mean_abs_score_difference": float(np.mean(np.abs(primary - shadow))),
            "mean_primary_score": float(primary.mean()),
            "mean_shadow_score": float(shadow.mean()),
            "ks_statistic": float(ks.statistic),
            "ks_p_value": float(ks.pvalue),
            "primary_latency_ms": _percentiles([p["primary_latency_ms"] for p in pairs]),
            "shadow_latency_ms": _percentiles([p["shadow_latency_ms"] for p in pairs]),
        }

    def close(self) -> None:
        self._scoring.shutdown(wait=True)
        self._explaining.shutdown(wait=True)
        self._shadow_pool.shutdown(wait=True)
        if self._anchors is not None:
            self._anchors.close()
        if self.mirror is not None:
            self.mirror.close()


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {}
    return {
        "count": len(ordered),
        "p50": float(np.percentile(ordered, 50)),
        "p99": float(np.percentile(ordered, 99)),
        "mean": float(statistics.fmean(ordered)),
    }
