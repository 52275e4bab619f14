"""Where the dashboard's figures come from, one module per source, each returning data or an
:class:`Unavailable` that says why not:

- :mod:`dashboards.sources.read_models`: the Parquet/JSON read models Dagster assets publish
  (drift history, monitoring figures, segments, calibration, rollout state and decisions);
- :mod:`dashboards.sources.registry`: the model registry (versions, reference sample, contract);
- :mod:`dashboards.sources.serving`: the serving REST API (health, router, predictions, admin);
- :mod:`dashboards.sources.dagster`: Dagster's GraphQL API (recent runs);
- :mod:`dashboards.sources.kafka`: the broker (lag past the landed offsets).

No Panel and no Dagster here, so every function is unit-testable without a browser. Readers never
open the live DuckDB warehouse (ARCHITECTURE.md, warehouse concurrency). Every network call has a
short timeout, because a page refresh must not hang on a dead dependency.
"""

from dataclasses import dataclass

import requests

__all__ = ["HTTP_TIMEOUT_S", "Unavailable", "first_line", "http_detail"]

HTTP_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Unavailable:
    """A source that cannot be shown, with the reason and what would fix it."""

    source: str
    reason: str
    hint: str = ""

    def message(self) -> str:
        text = f"{self.source} is unavailable: {self.reason}"
        return f"{text}. {self.hint}" if self.hint else text


def http_detail(response: requests.Response | None) -> str:
    """An HTTP answer's status and ``detail`` (FastAPI's error field) in one line."""
    if response is None:
        return "no response"
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    if isinstance(detail, list):
        detail = "; ".join(
            f"{'.'.join(str(p) for p in item.get('loc', []))}: {item.get('msg', '')}"
            for item in detail
        )
    return f"HTTP {response.status_code}: {str(detail)[:300]}"


def first_line(exc: Exception) -> str:
    """The first line of an exception's message (client libraries add pages of context)."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
