"""The serving process's REST API: health, router state and metrics, predictions and
explanations, and the admin actions (with the dashboard process's admin token)."""

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import requests

from churn_assets.config import Settings
from churn_assets.rollout_control import serving_url
from dashboards.sources import HTTP_TIMEOUT_S, Unavailable, http_detail

__all__ = ["ADMIN_TOKEN_ENV", "ActionResult", "ServingClient", "request_rate"]

ADMIN_TOKEN_ENV = "CHURN_ADMIN_TOKEN"
RETRAIN_PATH = "/admin/retrain"
# Serving launches the run in Dagster before it answers, which takes seconds on a busy machine.
RETRAIN_TIMEOUT_S = 30.0
RETRAIN_REFUSALS = {
    401: "the serving API did not accept the dashboard's admin token",
    409: "a rollout is in progress",
    503: "the serving API cannot reach Dagster",
}


@dataclass(frozen=True)
class ActionResult:
    """The outcome of an admin call: ``ok`` and a message to show."""

    ok: bool
    message: str
    body: Any = None


class ServingClient:
    """The serving process's REST API, with short timeouts.

    The admin token is read from ``CHURN_ADMIN_TOKEN`` in this (server-side) process and never
    reaches the browser.
    """

    def __init__(
        self, base_url: str, *, token: str | None = None, timeout_s: float = HTTP_TIMEOUT_S
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self._session = requests.Session()

    @classmethod
    def from_settings(cls, settings: Settings) -> "ServingClient":
        """The serving API where the rollout reaches it too: ``serving.url``, else built from
        ``serving.host``/``http_port`` (:func:`churn_assets.rollout_control.serving_url`)."""
        return cls(serving_url(settings), token=os.environ.get(ADMIN_TOKEN_ENV) or None)

    @property
    def admin_enabled(self) -> bool:
        return bool(self.token)

    def _unreachable(self, exc: Exception) -> Unavailable:
        return Unavailable(
            "Serving API",
            f"{self.base_url} does not answer ({type(exc).__name__})",
            "Start it with `churn serve` (or `churn up`).",
        )

    def _get(self, path: str, *, admin: bool = False) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if admin and self.token else {}
        response = self._session.get(self.base_url + path, headers=headers, timeout=self.timeout_s)
        response.raise_for_status()
        return (
            response.json()
            if "json" in response.headers.get("content-type", "")
            else (response.text)
        )

    def _read(self, path: str, source: str, *, admin: bool = False) -> Any:
        try:
            return self._get(path, admin=admin)
        except requests.HTTPError as exc:
            return Unavailable(source, http_detail(exc.response))
        except requests.RequestException as exc:
            return self._unreachable(exc)

    def health(self) -> dict[str, bool] | Unavailable:
        """Liveness and readiness of the server and of the router model."""
        result: dict[str, bool] = {}
        for name, path in (
            ("live", "/v2/health/live"),
            ("ready", "/v2/health/ready"),
            ("router ready", "/v2/models/churn-router/ready"),
        ):
            try:
                response = self._session.get(self.base_url + path, timeout=self.timeout_s)
            except requests.RequestException as exc:
                return self._unreachable(exc)
            result[name] = response.status_code == 200
        return result

    def router_metrics(self) -> dict[str, Any] | Unavailable:
        return self._read("/router/metrics", "Router metrics")

    def shadow_analysis(self) -> dict[str, Any] | Unavailable:
        return self._read("/router/shadow-analysis", "Shadow analysis")

    def prediction_counts(self) -> dict[str, float] | Unavailable:
        """``predictions_total`` summed by status, from the Prometheus exposition."""
        from prometheus_client.parser import text_string_to_metric_families

        text = self._read("/metrics", "Prometheus metrics")
        if isinstance(text, Unavailable):
            return text
        counts = {"ok": 0.0, "error": 0.0}
        for family in text_string_to_metric_families(text):
            if family.name != "predictions":
                continue
            for sample in family.samples:
                if sample.name == "predictions_total":
                    status = sample.labels.get("status", "ok")
                    counts[status] = counts.get(status, 0.0) + sample.value
        return counts

    def audit(self) -> list[dict[str, Any]] | Unavailable:
        if not self.admin_enabled:
            return Unavailable(
                "Router audit log",
                f"the dashboard has no admin token ({ADMIN_TOKEN_ENV} is not set)",
            )
        return self._read("/router/audit", "Router audit log", admin=True)

    def predict(self, features: Mapping[str, Any], customer_id: str | None = None):
        """``POST /predict`` -> the routed prediction dict, or Unavailable."""
        return self._post_json("/predict", _request_body(features, customer_id), "Prediction")

    def explain(
        self, features: Mapping[str, Any], version: str, customer_id: str | None = None
    ) -> dict[str, Any] | Unavailable:
        """SHAP contributions of each of the form's features for ``version`` (as many as there
        are features)."""
        path = f"/explain?version={version}&top_k={len(features)}"
        body = _request_body(features, customer_id)
        return self._post_json(path, body, f"Explanation ({version})")

    def _post_json(self, path: str, body: Any, source: str) -> Any:
        try:
            # User-triggered, so it may wait longer than a refresh: the first explanation of a
            # version builds its SHAP explainer.
            response = self._session.post(
                self.base_url + path, json=body, timeout=self.timeout_s * 5
            )
        except requests.RequestException as exc:
            return self._unreachable(exc)
        if response.status_code != 200:
            return Unavailable(source, http_detail(response))
        return response.json()

    # -- admin -------------------------------------------------------------------------------------
    def _admin(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        timeout_s: float | None = None,
        refusals: Mapping[int, str] | None = None,
        session: requests.Session | None = None,
    ) -> ActionResult:
        """An admin call with the bearer token; ``refusals`` names what a status means."""
        if not self.admin_enabled:
            return ActionResult(
                False, f"admin actions are disabled: set {ADMIN_TOKEN_ENV} for the dashboard"
            )
        try:
            response = (session or self._session).request(
                method,
                self.base_url + path,
                json=body,
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=timeout_s or self.timeout_s * 3,
            )
        except requests.RequestException as exc:
            return ActionResult(False, self._unreachable(exc).message())
        if response.status_code != 200:
            meaning = (refusals or {}).get(response.status_code)
            refused = f"refused ({meaning})" if meaning else "refused"
            return ActionResult(False, f"{refused}: {http_detail(response)}")
        return ActionResult(True, "done", response.json())

    def retrain(self, reason: str) -> ActionResult:
        """``POST /admin/retrain {"reason"}``: launch the retraining job in the platform's
        Dagster instance; on success the message names the run id (``body`` is the answer:
        ``run_id``, ``job``, ``reason``). Blocking (a Dagster launch takes seconds): pages call
        it off the event loop, on a session of its own, since ``requests.Session`` is not
        thread-safe."""
        with requests.Session() as session:
            result = self._admin(
                "POST",
                RETRAIN_PATH,
                {"reason": reason},
                timeout_s=RETRAIN_TIMEOUT_S,
                refusals=RETRAIN_REFUSALS,
                session=session,
            )
        if not result.ok:
            return result
        answer = result.body if isinstance(result.body, dict) else {}
        if not answer.get("run_id"):
            return ActionResult(False, f"{RETRAIN_PATH} answered without a run id: {answer!r}")
        return ActionResult(
            True, f"run {answer['run_id']} of {answer.get('job', 'the retraining job')}", answer
        )

    def promote(self) -> ActionResult:
        return self._admin("POST", "/router/promote-v2")

    def rollback(self) -> ActionResult:
        return self._admin("POST", "/router/rollback")

    def set_policy(
        self, strategy: str, canary_weight: float | None = None, challenger: str | None = None
    ) -> ActionResult:
        body: dict[str, Any] = {"strategy": strategy}
        if canary_weight is not None:
            body["canary_weight"] = canary_weight
        if challenger is not None:
            body["challenger"] = challenger
        return self._admin("PUT", "/router/policy", body)


def _request_body(features: Mapping[str, Any], customer_id: str | None) -> dict[str, Any]:
    body = dict(features)
    if customer_id:
        body["customer_id"] = customer_id
    return body


def request_rate(
    previous: tuple[float, float] | None, current: tuple[float, float]
) -> float | None:
    """Requests per second between two ``(monotonic time, total requests)`` samples; ``None``
    until there are two samples, or when the counter went backwards (the server restarted)."""
    if previous is None:
        return None
    elapsed = current[0] - previous[0]
    delta = current[1] - previous[1]
    if elapsed <= 0 or delta < 0:
        return None
    return delta / elapsed
