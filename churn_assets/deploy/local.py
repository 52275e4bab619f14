"""The local serving process as a deployment target: its admin API over HTTP.

Only transient connection failures are retried, a bounded number of times. A ``POST`` (promote,
rollback: not idempotent) is retried only when the connection was never established, so a
request the server may have processed is never sent twice.
"""

import logging
import time
from typing import Any

import requests
import urllib3

from churn_assets.deploy.model import Deployment, DeploymentError

__all__ = ["LocalServingTarget"]

log = logging.getLogger(__name__)


def _never_connected(exc: requests.RequestException) -> bool:
    """Whether the request certainly never reached the server (safe to resend a POST)."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    if isinstance(exc, requests.ConnectionError):
        reason = exc.args[0] if exc.args else None
        reason = getattr(reason, "reason", reason)
        return isinstance(reason, urllib3.exceptions.NewConnectionError)
    return False


class LocalServingTarget:
    """The local serving process's admin API (``docs/SERVING.md``).

    ``apply`` reads the router state, then promotes (the deployment's champion is the served
    challenger), rolls back (it is the previous champion) and sets the policy (strategy, challenger,
    canary weight). A deployment of a single version removes any challenger the router still
    serves or shadows (``remove_challenger``), so a rolled-back version gets no more traffic.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        timeout_s: float = 10,
        retries: int = 2,
        backoff_s: float = 0.5,
    ) -> None:
        if not token:
            raise DeploymentError("the serving admin API needs a token (CHURN_ADMIN_TOKEN)")
        if retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise DeploymentError("retries and backoff_s must be >= 0 and timeout_s > 0")
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s

    def describe(self) -> dict[str, Any]:
        """The URL and limits; never the token."""
        return {
            "target": "local-serving",
            "base_url": self.base_url,
            "timeout_s": self.timeout_s,
            "retries": self.retries,
        }

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        url = f"{self.base_url}{path}"
        headers = {"Authorization": f"Bearer {self._token}"} if method != "GET" else {}
        idempotent = method in ("GET", "PUT")
        for attempt in range(self.retries + 1):
            try:
                response = requests.request(
                    method, url, json=body, headers=headers, timeout=self.timeout_s
                )
                break
            except (requests.ConnectionError, requests.Timeout) as exc:
                retryable = idempotent or _never_connected(exc)
                if not retryable or attempt == self.retries:
                    raise DeploymentError(
                        f"{method} {url} failed after {attempt + 1} attempt(s): {exc}"
                    ) from exc
                log.warning("%s %s failed (%s); retrying", method, url, exc)
                time.sleep(self.backoff_s * 2**attempt)
        if not 200 <= response.status_code < 300:
            raise DeploymentError(
                f"{method} {url} answered HTTP {response.status_code}: {response.text[:500]}"
            )
        try:
            return response.json()
        except ValueError as exc:
            detail = response.text[:200]
            raise DeploymentError(f"{method} {url} answered non-JSON: {detail}") from exc

    def router_state(self) -> dict[str, Any]:
        """The router's state from ``GET /router/metrics``."""
        return self._call("GET", "/router/metrics")["state"]

    def apply(self, deployment: Deployment) -> dict[str, Any]:
        """Bring the router to ``deployment``; returns the calls made and the final state.

        A different champion is reached by promoting the served challenger, by rolling back to
        the previous champion (stopping a running canary first, which a rollback would
        otherwise stop instead), or, for any other registered version, by loading it as the
        challenger and promoting it. The final router state is checked against the deployment.
        """
        state = self.router_state()
        calls: list[str] = []
        if deployment.champion != state["champion"]:
            previous = state.get("previous_champions") or []
            if deployment.champion == state.get("challenger"):
                self._call("POST", "/router/promote-v2")
                calls.append("promote")
            elif previous and deployment.champion == previous[-1]:
                if state.get("strategy") == "canary" and state.get("challenger"):
                    self._call(
                        "PUT", "/router/policy", {"strategy": "shadow", "canary_weight": 0.0}
                    )
                    calls.append("policy")
                self._call("POST", "/router/rollback")
                calls.append("rollback")
            else:
                self._call(
                    "PUT",
                    "/router/policy",
                    {"strategy": "shadow", "canary_weight": 0.0, "challenger": deployment.champion},
                )
                self._call("POST", "/router/promote-v2")
                calls += ["policy", "promote"]
        if deployment.challenger is not None:
            policy = {
                "strategy": deployment.strategy,
                "canary_weight": deployment.challenger_traffic,
                "challenger": deployment.challenger,
            }
            self._call("PUT", "/router/policy", policy)
            calls.append("policy")
        else:
            # A single version: whatever challenger the router still serves or shadows (a
            # rolled-back canary or shadow, or the version a rollback demoted) is dropped.
            current = self.router_state() if calls else state
            if current.get("challenger"):
                self._call(
                    "PUT",
                    "/router/policy",
                    {"strategy": "shadow", "canary_weight": 0.0, "remove_challenger": True},
                )
                calls.append("policy")
        final = self.router_state()
        if final.get("champion") != deployment.champion or (
            final.get("challenger") != deployment.challenger
        ):
            raise DeploymentError(
                f"the router serves champion {final.get('champion')} / challenger "
                f"{final.get('challenger')} after {calls}, not {deployment.champion} / "
                f"{deployment.challenger}"
            )
        return {"target": "local-serving", "calls": calls, "state": final}
