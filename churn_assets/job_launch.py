"""Launching the platform's Dagster jobs through the Dagster webserver's GraphQL API.

Serving and the dashboard never import Dagster; they reach the platform's Dagster instance the
way the Dagster UI does, over the webserver's GraphQL endpoint (``dagster.url``, or the local
``dagster.webserver_port``): the same call works beside ``churn up`` (``dagster dev``: webserver
and daemon) and against the webserver's service on Kubernetes or Compose. A launch finds the code
location and repository that define the job, then calls ``launchRun``; the run is queued in the
instance, and the daemon starts it, as a launch from the UI's launchpad would be.

No Dagster imports; the calls block (``requests``, with a timeout): async callers run them in a
thread.
"""

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import requests

from churn_assets.config import DagsterSettings

__all__ = [
    "REASON_TAG",
    "REQUESTED_VIA_TAG",
    "RETRAINING_JOB",
    "LaunchError",
    "LaunchedRun",
    "graphql_url",
    "launch_job",
]

RETRAINING_JOB = "retraining_job"
# The retraining reason, as `churn retrain`, the sensor and the schedule record it.
REASON_TAG = "churn/retraining_reason"
REQUESTED_VIA_TAG = "churn/requested_via"
TIMEOUT_S = 10.0

_LOCATIONS_QUERY = """
query ChurnJobLocations {
  repositoriesOrError {
    __typename
    ... on RepositoryConnection { nodes { name location { name } jobs { name } } }
    ... on Error { message }
  }
}
"""

_LAUNCH_MUTATION = """
mutation ChurnLaunchRun($executionParams: ExecutionParams!) {
  launchRun(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on Error { message }
  }
}
"""


class LaunchError(RuntimeError):
    """The job was not launched: Dagster could not be reached, or it refused (the message says
    which, and why)."""


@dataclass(frozen=True)
class LaunchedRun:
    run_id: str
    job: str
    location: str
    repository: str


def graphql_url(dagster: DagsterSettings) -> str:
    """The Dagster webserver's GraphQL endpoint: under ``dagster.url`` (e.g. the webserver's
    service) when it is set, else on this machine's ``dagster.webserver_port``."""
    base = dagster.url or f"http://127.0.0.1:{dagster.webserver_port}"
    return f"{base.rstrip('/')}/graphql"


def _call(url: str, query: str, variables: Mapping[str, Any], timeout_s: float) -> dict[str, Any]:
    try:
        response = requests.post(
            url, json={"query": query, "variables": dict(variables)}, timeout=timeout_s
        )
    except requests.RequestException as exc:
        raise LaunchError(
            f"the Dagster webserver at {url} cannot be reached ({type(exc).__name__}): is "
            "Dagster running (`churn up`), and does dagster.url name its webserver?"
        ) from exc
    if response.status_code != 200:
        raise LaunchError(
            f"the Dagster webserver at {url} answered HTTP {response.status_code}: "
            f"{' '.join(response.text.split())[:300]}"
        )
    try:
        document = response.json()
    except ValueError as exc:
        raise LaunchError(f"the Dagster webserver at {url} answered something not JSON") from exc
    if document.get("errors"):
        messages = "; ".join(str(e.get("message", e)) for e in document["errors"])
        raise LaunchError(f"Dagster's GraphQL API at {url} refused the call: {messages[:500]}")
    data = document.get("data")
    if not isinstance(data, dict):
        raise LaunchError(f"Dagster's GraphQL API at {url} answered no data: {document}")
    return data


def _locate(url: str, job: str, timeout_s: float) -> tuple[str, str]:
    result = _call(url, _LOCATIONS_QUERY, {}, timeout_s)["repositoriesOrError"]
    if result["__typename"] != "RepositoryConnection":
        raise LaunchError(f"Dagster could not list its code locations: {result.get('message')}")
    found = [
        (node["location"]["name"], node["name"])
        for node in result["nodes"]
        if any(defined["name"] == job for defined in node["jobs"])
    ]
    if len(found) != 1:
        listed = ", ".join(f"{location}/{repo}" for location, repo in found) or "none"
        raise LaunchError(
            f"Dagster at {url} needs exactly one code location defining {job}; found {listed} "
            "(is the churn_platform code location loaded?)"
        )
    return found[0]


def launch_job(
    url: str, job: str, tags: Mapping[str, str], *, timeout_s: float = TIMEOUT_S
) -> LaunchedRun:
    """Launch ``job`` with run ``tags`` through the GraphQL API at ``url``; the new run's id.
    Raises :class:`LaunchError` with the reason when Dagster cannot be reached or refuses."""
    location, repository = _locate(url, job, timeout_s)
    params = {
        "selector": {
            "repositoryLocationName": location,
            "repositoryName": repository,
            "jobName": job,
        },
        "runConfigData": {},
        "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in tags.items()]},
    }
    result = _call(url, _LAUNCH_MUTATION, {"executionParams": params}, timeout_s)["launchRun"]
    kind = result["__typename"]
    if kind == "LaunchRunSuccess":
        return LaunchedRun(result["run"]["runId"], job, location, repository)
    detail = result.get("message") or json.dumps(result.get("errors") or result)[:500]
    raise LaunchError(f"Dagster refused to launch {job} ({kind}): {detail}")
