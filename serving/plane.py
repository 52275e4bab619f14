"""The transport-neutral serving data plane: routing, scoring, shadowing, mirroring,
explanations and router administration. REST, gRPC (through MLServer) and the product's
convenience endpoints only translate to and from it. What requests carry is checked in
:mod:`serving.requests`, events are encoded in :mod:`serving.mirror`, shadow work runs in
:mod:`serving.micro_batches`, reports are computed in :mod:`serving.reports`.
"""

import asyncio
import functools
import itertools
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

import numpy as np

from churn_assets.config import Settings
from churn_assets.contract import Contract, ContractError
from churn_assets.model import ScoringModel, load_model
from churn_assets.registry import ModelRegistry, RegistryError
from serving.errors import InvalidInput, NotFound, ServingError, Unavailable
from serving.metrics import ServingMetrics
from serving.micro_batches import MicroBatches
from serving.mirror import prediction_event_bytes
from serving.reports import percentiles, shadow_report
from serving.requests import Batch, RequestModels, request_models, validate_records
from serving.router import (
    RouterError,
    RouterState,
    RouterStore,
    promote,
    reconcile,
    rollback,
    route,
)

__all__ = ["Prediction", "ServingPlane"]

log = logging.getLogger(__name__)
T = TypeVar("T")

MODEL_NAME = "churn"
# The shadow thread, woken by a request, waits this long for others before scoring them all at
# once: under load fewer, larger passes take the interpreter's lock from requests less often.
SHADOW_LINGER_S = 0.005


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
    """Everything a request needs, shared by all transports in one process.

    Requests are validated against :attr:`contract`, the contract the champion was trained with
    when the process started (its request models: :attr:`requests`). A challenger, or a
    champion a promotion or rollback would bring, is served only when requests of that shape
    give it every input it needs (:meth:`Contract.missing_inputs`): at start-up an incompatible
    challenger is logged and left out, and a router change to one is refused with 409.
    """

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
        self._shadows = MicroBatches(self._score_shadows, name="shadow", linger_s=SHADOW_LINGER_S)
        self._metric_children: dict[tuple[str, str], tuple[Any, Any]] = {}
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
        self.contract: Contract
        self.requests: RequestModels
        self.state = self._initial_state()
        # A Seldon predictor pod serves one version on one rollout arm (``serving.arm``, set by
        # its manifest): its answers carry that arm, and its series exist from the start so
        # Prometheus's increase() counts the first requests too.
        self._pinned_arm = settings.serving.arm
        if self._pinned_arm is not None:
            for status in ("ok", "error"):
                self.metrics.predictions_total.labels(
                    version=self.state.champion, arm=self._pinned_arm, status=status
                )
            self._children(self.state.champion, self._pinned_arm)
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
        state, dropped = self._serve_contract_of(state)
        detail = {"changes": [dropped]} if dropped else {}
        return self.store.save(state, action="init", actor="system", detail=detail)

    def _serve_contract_of(self, state: RouterState) -> tuple[RouterState, str | None]:
        """Serve the contract of ``state``'s champion; a challenger that requests of that
        shape cannot serve is left out (logged), with what it lacks."""
        self.contract = self._get(state.champion).model.contract
        self.requests = request_models(self.contract)
        if not state.challenger:
            return state, None
        problem = self.incompatibility(state.challenger)
        if problem is None:
            return state, None
        log.warning("challenger not served: %s", problem)
        return replace(
            state,
            challenger=None,
            strategy="shadow" if state.strategy == "canary" else state.strategy,
        ).validate(), f"challenger {state.challenger} dropped: {problem}"

    def incompatibility(self, version: str) -> str | None:
        """Why ``version`` cannot answer requests of the served contract, or ``None``."""
        missing = self._get(version).model.contract.missing_inputs(self.contract)
        if not missing:
            return None
        return (
            f"{version} needs inputs that requests of the served contract (the champion's, "
            f"{self.contract.digest[:12]}) do not give: {'; '.join(missing)}"
        )

    def _restored_state(self, stored: RouterState) -> RouterState:
        """The stored state, reconciled with the registry's aliases (see :func:`reconcile`): a
        rollout resumes where it was unless the registry moved on while serving was down."""
        aliases = self.registry.aliases()
        state, changes = reconcile(stored, aliases.get("champion"), aliases.get("challenger"))
        if "champion" not in aliases:
            log.warning("the registry has no champion alias; serving the stored router state")
        state, dropped = self._serve_contract_of(state)
        if dropped:
            changes = (*changes, dropped)
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
                except (RegistryError, ContractError) as exc:
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
        for version in {self.state.champion, self.state.challenger}:
            if version is None:
                continue
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
    def validate(self, rows: Sequence[Mapping[str, Any]] | Batch) -> Batch:
        """``rows`` checked against the served contract (a :class:`Batch` is already)."""
        return rows if isinstance(rows, Batch) else validate_records(rows, self.contract)

    def predict(self, rows: Sequence[Mapping[str, Any]] | Batch) -> list[Prediction]:
        """Validate, route, score and mirror a batch of records."""
        batch = self.validate(rows)
        started = time.perf_counter()
        state = self.state
        request_ids = [r or _new_request_id() for r in batch.request_ids]
        routes = [
            route(state, c or r) for c, r in zip(batch.customer_ids, request_ids, strict=True)
        ]
        pinned = self._pinned_arm
        by_version: dict[str, list[int]] = {}
        for index, target in enumerate(routes):
            by_version.setdefault(target.primary, []).append(index)
        results: list[Prediction | None] = [None] * len(batch)
        pending = list(by_version.items())
        while pending:
            version, indices = pending.pop(0)
            part = batch.take(indices)
            try:
                loaded = self._get(version)
                x = loaded.model.transformer.transform_columns(part.columns, len(part))
                probabilities = loaded.model.predict_matrix(x)
            except Exception:
                self._count_errors(version, [pinned or routes[i].arm for i in indices])
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
                    request_id=request_ids[i],
                    customer_id=batch.customer_ids[i],
                    probability=float(probabilities[position]),
                    model_version=version,
                    arm=pinned or routes[i].arm,
                    outlier_score=None if scores is None else float(scores[position]),
                    is_outlier=None if flags is None else bool(flags[position]),
                    latency_ms=elapsed_ms,
                )
        predictions = [p for p in results if p is not None]
        self._record(predictions, [batch])
        shadows = {s for target in routes for s in target.shadows}
        if shadows:
            self._shadows.submit(shadows, batch, predictions)
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

    def _children(self, version: str, arm: str) -> tuple[Any, Any]:
        """The Prometheus children of one (version, arm): its ok-counter and latency histogram,
        looked up once (``labels()`` costs a lock and a dict walk per call)."""
        key = (version, arm)
        children = self._metric_children.get(key)
        if children is None:
            children = (
                self.metrics.predictions_total.labels(version=version, arm=arm, status="ok"),
                self.metrics.prediction_latency_seconds.labels(version=version, arm=arm),
            )
            self._metric_children[key] = children
        return children

    def _record(self, predictions: Sequence[Prediction], batches: Sequence[Batch]) -> None:
        """Count and time ``predictions`` (Prometheus and the rollout's counters), then mirror
        them to Kafka with the features of their records, ``batches`` in order."""
        for prediction in predictions:
            ok, latency = self._children(prediction.model_version, prediction.arm)
            ok.inc()
            latency.observe(prediction.latency_ms / 1000)
        with self._lock:
            for prediction in predictions:
                key = (prediction.model_version, prediction.arm)
                latencies = self._latencies.get(key)
                if latencies is None:
                    latencies = self._latencies[key] = deque(maxlen=5000)
                latencies.append(prediction.latency_ms)
                count_key = (*key, "ok")
                self._counts[count_key] = self._counts.get(count_key, 0) + 1
        if self.mirror is not None:
            predicted_at = datetime.now(UTC)
            features = (record for batch in batches for record in batch.features)
            for prediction, record in zip(predictions, features, strict=True):
                self.mirror.publish_encoded(
                    prediction.request_id,
                    prediction_event_bytes(prediction, record, predicted_at, MODEL_NAME),
                )

    def _score_shadows(self, work: list[tuple[set[str], Batch, list[Prediction]]]) -> None:
        """Off the request path (the shadow thread): score the shadow versions of a micro-batch
        of requests, one transform and one model call per version, record pairs, mirror them.
        Each pair's shadow latency is the micro-batch's scoring time."""
        champion = self.state.champion
        for version in sorted({v for versions, _, _ in work for v in versions}):
            items = [(batch, primary) for versions, batch, primary in work if version in versions]
            rows = sum(len(batch) for batch, _ in items)
            try:
                loaded = self._get(version)
                started = time.perf_counter()
                columns = {
                    name: [v for batch, _ in items for v in batch.columns[name]]
                    for name in items[0][0].columns
                }
                x = loaded.model.transformer.transform_columns(columns, rows)
                probabilities = loaded.model.predict_matrix(x)
                elapsed_ms = (time.perf_counter() - started) * 1000
                threshold = self._get(champion).threshold
                primaries = [p for _, batch_primaries in items for p in batch_primaries]
                shadows = []
                for primary, p in zip(primaries, probabilities, strict=True):
                    shadows.append(
                        replace(
                            primary,
                            probability=float(p),
                            model_version=version,
                            arm="shadow",
                            latency_ms=elapsed_ms,
                            outlier_score=None,
                            is_outlier=None,
                        )
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
                self._record(shadows, [batch for batch, _ in items])
            except Exception:  # shadow failures never reach callers; they are counted
                log.exception("shadow scoring of %s failed", version)
                self._count_errors(version, ["shadow"] * rows)

    def contract_of(self, version: str) -> Contract:
        """The contract ``version`` was trained with (the one its own V2 model serves)."""
        return self._get(version).model.contract

    def predict_version(
        self, version: str, rows: Sequence[Mapping[str, Any]] | Batch
    ) -> np.ndarray:
        """Score with one version directly (the per-version V2 models), validated against that
        version's own contract; no routing, no mirror."""
        loaded = self._get(version)
        batch = rows if isinstance(rows, Batch) else validate_records(rows, loaded.model.contract)
        return loaded.model.predict_columns(batch.columns, len(batch))

    def drain_shadows(self, timeout_s: float = 10.0) -> None:
        """Wait for queued shadow work (tests, shutdown)."""
        self._shadows.drain(timeout_s)

    # -- explanations ---------------------------------------------------------------------------
    def _explained_version(self, batch: Batch, version: str | None) -> _Loaded:
        target = version or route(self.state, batch.customer_ids[0] or uuid.uuid4().hex).primary
        if version is not None:
            problem = self.incompatibility(version)
            if problem is not None:
                raise ServingError(f"cannot explain with {problem}", 409)
        return self._get(target)

    def explain(self, row: Mapping[str, Any], *, version: str | None = None, top_k: int = 5):
        batch = self.validate([row])
        loaded = self._explained_version(batch, version)
        with self._lock:
            if loaded.explainer is None:
                from churn_assets.explain import ShapExplainer

                loaded.explainer = ShapExplainer(loaded.model)
        explanation = loaded.explainer.explain_records(batch.features)[0]
        return {
            **explanation.as_dict(top_k),
            "model_version": loaded.model.version,
            "method": "shap",
        }

    async def explain_anchors(
        self, row: Mapping[str, Any], *, version: str | None = None
    ) -> dict[str, Any]:
        """Alibi AnchorTabular rule for the record, computed in a separate process."""
        from churn_assets.outliers import REFERENCE_FILE

        batch = self.validate([row])
        loaded = self._explained_version(batch, version)
        target = loaded.model.version or ""
        files = loaded.model.to_files()
        if REFERENCE_FILE not in files:
            raise ServingError(f"{target} has no reference sample to fit anchors on", 409)
        if self._anchors is None:
            from serving.anchors import AnchorService

            self._anchors = AnchorService(seed=self.settings.training.seed)
        return await self._anchors.explain(
            target, files, batch.features[0], decision=loaded.threshold
        )

    # -- administration -------------------------------------------------------------------------
    def _change(self, new_state: RouterState, action: str, actor: str, **detail: Any):
        for version in (new_state.champion, new_state.challenger):
            if version:
                problem = self.incompatibility(version)
                if problem is not None:
                    raise ServingError(f"router not changed: {problem}", 409)
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
                f"{version}/{arm}": percentiles(values)
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
        return shadow_report(pairs, errors, version)

    def close(self) -> None:
        self._scoring.shutdown(wait=True)
        self._explaining.shutdown(wait=True)
        self._shadows.close()
        if self._anchors is not None:
            self._anchors.close()
        if self.mirror is not None:
            self.mirror.close()


_PROCESS_ID = uuid.uuid4().hex[:20]
_REQUEST_NUMBERS = itertools.count()


def _new_request_id() -> str:
    """A request id unique across processes and restarts (a random per-process prefix and a
    counter, 32 hex digits as a uuid's), without a system call per request as ``uuid4`` has."""
    return f"{_PROCESS_ID}{next(_REQUEST_NUMBERS) & 0xFFFFFFFFFFFF:012x}"
