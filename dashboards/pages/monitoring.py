"""Monitoring: serving health, requests/s, latency, error rate, Kafka lag and Dagster runs,
refreshed on a timer."""

import time
from collections import deque
from datetime import UTC, datetime

import pandas as pd
import panel as pn
import param
from bokeh.models import ColumnDataSource

from dashboards import charts
from dashboards.pages.common import Context, explanation, heading, stat_cards, table
from dashboards.sources import Unavailable
from dashboards.sources.dagster import dagster_runs
from dashboards.sources.kafka import kafka_lag
from dashboards.sources.serving import request_rate

__all__ = ["MonitoringPage"]


class MonitoringPage(pn.viewable.Viewer):
    """Live serving and pipeline health."""

    refresh_s = param.Number(default=5.0, bounds=(1.0, 300.0), doc="Seconds between refreshes.")
    lag_budget_s = param.Number(
        default=1.0, bounds=(0.1, 10.0), doc="Time allowed to count Kafka lag on each refresh."
    )

    def __init__(self, context: Context, **params) -> None:
        super().__init__(**params)
        self.context = context
        self._previous: tuple[float, float] | None = None
        self._rates: deque[tuple[pd.Timestamp, float]] = deque(maxlen=120)
        self.cards = pn.pane.HTML(sizing_mode="stretch_width")
        self.updated = pn.pane.Markdown(margin=(0, 10))
        self._rate_source = ColumnDataSource({"t": [], "rate": []})
        self._rate_figure = charts.rate_chart(self._rate_source)
        self.rate_plot = pn.pane.Bokeh(self._rate_figure, sizing_mode="stretch_width")
        self.latency = pn.Column(sizing_mode="stretch_width")
        self.lag = pn.Column(sizing_mode="stretch_width")
        self.runs = pn.Column(sizing_mode="stretch_width")
        self.refresh()
        if pn.state.curdoc is not None:
            pn.state.add_periodic_callback(self.refresh, period=int(self.refresh_s * 1000))

    def refresh(self) -> None:
        serving = self.context.serving
        health = serving.health()
        metrics = serving.router_metrics()
        counts = serving.prediction_counts()
        cards: list[tuple[str, str, str, str]] = []
        if isinstance(health, Unavailable):
            cards.append(("Serving", "unreachable", serving.base_url, "bad"))
        else:
            ready = health["ready"] and health["router ready"]
            cards.append(
                (
                    "Serving",
                    "ready" if ready else "not ready",
                    serving.base_url,
                    "good" if ready else "bad",
                )
            )
        rate = None
        if not isinstance(counts, Unavailable):
            total = counts.get("ok", 0.0) + counts.get("error", 0.0)
            sample = (time.monotonic(), total)
            rate = request_rate(self._previous, sample)
            self._previous = sample
            if rate is not None:
                self._rates.append((pd.Timestamp.now(), rate))
            errors = counts.get("error", 0.0)
            cards.append(
                (
                    "Requests/s",
                    "measuring…" if rate is None else f"{rate:.1f}",
                    f"{total:,.0f} predictions in total",
                    "",
                )
            )
            error_rate = errors / total if total else 0.0
            cards.append(
                (
                    "Error rate",
                    f"{error_rate:.2%}",
                    f"{errors:,.0f} failed predictions",
                    "bad" if error_rate > 0.01 else "good",
                )
            )
        if not isinstance(metrics, Unavailable):
            state = metrics["state"]
            key = f"{state['champion']}/primary"
            champion_latency = metrics["latency_ms"].get(key, {})
            for label in ("p50", "p99"):
                value = champion_latency.get(label)
                cards.append(
                    (
                        f"Latency {label}",
                        "—" if value is None else f"{value:.1f} ms",
                        f"champion {state['champion']}",
                        "",
                    )
                )
            cards.append(
                (
                    "Router",
                    state["strategy"],
                    f"champion {state['champion']}, challenger {state['challenger'] or '—'}",
                    "",
                )
            )
        lag = kafka_lag(
            self.context.settings,
            self.context.read_models.frame("landing_offsets", what="Landing offsets"),
            budget_s=self.lag_budget_s,
        )
        if isinstance(lag, Unavailable):
            cards.append(("Kafka lag", "unknown", "broker unreachable", "warn"))
        else:
            exact = bool(lag["exact"].all())
            total_lag = int(lag["lag"].sum())
            cards.append(
                (
                    "Kafka lag",
                    f"{total_lag:,}" if exact else f"≥ {total_lag:,}",
                    "messages not landed yet",
                    "good" if total_lag == 0 else "warn",
                )
            )
        self.cards.object = stat_cards(cards)
        self.updated.object = (
            f"Updated {datetime.now(UTC):%H:%M:%S} UTC, every {self.refresh_s:g} s."
        )
        charts.update_rate_chart(self._rate_figure, self._rate_source, list(self._rates))
        self.latency.objects = [self._latency_table(metrics)]
        self.lag.objects = [self._lag_table(lag)]
        runs = dagster_runs(self.context.settings)
        self.runs.objects = [explanation(runs) if isinstance(runs, Unavailable) else table(runs)]

    @staticmethod
    def _latency_table(metrics):
        if isinstance(metrics, Unavailable):
            return explanation(metrics)
        rows = [
            {
                "version/arm": key,
                "requests": figures.get("count"),
                "p50 ms": figures.get("p50"),
                "p99 ms": figures.get("p99"),
                "mean ms": figures.get("mean"),
            }
            for key, figures in sorted(metrics["latency_ms"].items())
        ]
        if not rows:
            return pn.pane.Alert("No predictions served yet.", alert_type="info")
        return table(pd.DataFrame(rows))

    @staticmethod
    def _lag_table(lag):
        if isinstance(lag, Unavailable):
            return explanation(lag)
        shown = lag.assign(
            lag=[
                f"{n:,}" if exact else f"≥ {n:,}"
                for n, exact in zip(lag["lag"], lag["exact"], strict=True)
            ]
        )
        return table(shown.drop(columns="exact"))

    def __panel__(self):
        return pn.Column(
            heading("Monitoring", 2),
            self.updated,
            self.cards,
            heading("Requests per second"),
            self.rate_plot,
            heading("Latency percentiles per version and arm"),
            self.latency,
            heading("Kafka lag (messages past the landed offsets)"),
            self.lag,
            heading("Recent Dagster runs"),
            self.runs,
            sizing_mode="stretch_width",
        )
