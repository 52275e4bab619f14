"""Dagster's GraphQL API on the webserver: the most recent runs (no ``dagster`` import)."""

from datetime import UTC, datetime

import pandas as pd
import requests

from churn_assets.config import Settings
from dashboards.sources import HTTP_TIMEOUT_S, Unavailable, http_detail

__all__ = ["DAGSTER_RUNS_QUERY", "dagster_graphql_url", "dagster_runs"]


DAGSTER_RUNS_QUERY = """
query DashboardRuns($limit: Int) {
  runsOrError(limit: $limit) {
    __typename
    ... on Runs {
      results { runId jobName status creationTime startTime endTime }
    }
    ... on PythonError { message }
    ... on InvalidPipelineRunsFilterError { message }
  }
}
"""


def dagster_graphql_url(settings: Settings) -> str:
    """The Dagster webserver's GraphQL endpoint: under ``dagster.url`` when it is set (e.g. the
    webserver's service name in Docker Compose), else on this machine's ``webserver_port``."""
    base = settings.dagster.url or f"http://127.0.0.1:{settings.dagster.webserver_port}"
    return f"{base.rstrip('/')}/graphql"


def dagster_runs(settings: Settings, limit: int = 10) -> pd.DataFrame | Unavailable:
    """The most recent Dagster runs from the webserver's GraphQL API."""
    url = dagster_graphql_url(settings)
    source = "Dagster runs"
    try:
        response = requests.post(
            url,
            json={"query": DAGSTER_RUNS_QUERY, "variables": {"limit": limit}},
            timeout=HTTP_TIMEOUT_S,
        )
    except requests.RequestException as exc:
        return Unavailable(
            source,
            f"the Dagster webserver at {url} does not answer ({type(exc).__name__})",
            "Start it with `churn up` or `dagster dev`.",
        )
    if response.status_code != 200:
        return Unavailable(source, http_detail(response))
    try:
        payload = response.json()
    except ValueError:
        return Unavailable(source, f"{url} did not answer JSON")
    if payload.get("errors"):
        return Unavailable(source, "; ".join(e.get("message", "") for e in payload["errors"]))
    result = (payload.get("data") or {}).get("runsOrError") or {}
    if result.get("__typename") != "Runs":
        return Unavailable(source, result.get("message") or f"unexpected answer {result!r}")
    runs = result.get("results") or []
    if not runs:
        return Unavailable(source, "Dagster has no runs yet")
    rows = []
    for run in runs:
        started = run.get("startTime") or run.get("creationTime")
        ended = run.get("endTime")
        rows.append(
            {
                "run": run["runId"][:8],
                "job": run["jobName"],
                "status": run["status"],
                "started": _timestamp(started),
                "duration_s": None if not (started and ended) else round(ended - started, 1),
            }
        )
    return pd.DataFrame(rows)


def _timestamp(epoch_s: float | None) -> str:
    if not epoch_s:
        return "—"
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%d %H:%M:%S")
