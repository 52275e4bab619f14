"""Drift: per-feature p-values over time against the threshold, reference vs live distributions,
multivariate drift and the open alerts."""

import pandas as pd
import panel as pn
import param

from dashboards import charts
from dashboards.pages.common import Context, explanation, heading, stat_cards, table
from dashboards.sources import Unavailable
from dashboards.sources.read_models import open_alerts
from dashboards.sources.registry import form_contract, reference_sample

__all__ = ["DriftPage"]


class DriftPage(pn.viewable.Viewer):
    """Feature and multivariate drift of the live window against the champion's reference."""

    feature = param.Selector(doc="Feature to compare (one of the champion's contract).")

    def __init__(self, context: Context, **params) -> None:
        super().__init__(**params)
        self.context = context
        contract = form_contract(context.settings).contract
        # Categories and booleans are compared as shares of each value; numbers as densities.
        self.categorical = {f.name for f in contract.of_kind("category", "boolean")}
        self.param.feature.objects = list(contract.names)
        if self.feature not in contract.names:
            self.feature = contract.names[0]
        self.threshold = context.settings.monitoring.drift_detection.threshold
        self.history = context.read_models.drift_history()
        self.monitoring = context.read_models.monitoring()
        self._reference: pd.DataFrame | Unavailable | None = None
        self._live: pd.DataFrame | Unavailable | None = None

    def _p_values(self):
        if isinstance(self.history, Unavailable):
            return explanation(self.history)
        reports = self.history["computed_at"].drop_duplicates().sort_values()
        if len(reports) == 1:
            note = (
                f"One report so far, computed {reports.iloc[0]:%Y-%m-%d %H:%M} UTC: each point is "
                "a feature's corrected p-value. The history builds as reports come (each "
                "drift_report run adds one)."
            )
        else:
            note = (
                f"{len(reports)} reports from {reports.iloc[0]:%Y-%m-%d %H:%M} to "
                f"{reports.iloc[-1]:%Y-%m-%d %H:%M} UTC, one line per feature."
            )
        return pn.Column(
            pn.pane.Markdown(note, margin=(0, 10), css_classes=["history-note"]),
            pn.pane.Bokeh(
                charts.p_value_chart(self.history, self.threshold), sizing_mode="stretch_width"
            ),
            pn.pane.HTML(
                charts.colour_key(charts.feature_colours(self.history["feature"])),
                sizing_mode="stretch_width",
            ),
            sizing_mode="stretch_width",
        )

    def _latest_report(self):
        if isinstance(self.history, Unavailable):
            return explanation(self.history)
        latest = self.history.loc[self.history["computed_at"] == self.history["computed_at"].max()]
        first = latest.iloc[0]
        caption = pn.pane.Markdown(
            f"Report of {first['computed_at']:%Y-%m-%d %H:%M} UTC on {int(first['live_rows']):,}"
            f" live rows, model {first['model_version']}, threshold {self.threshold}.",
            margin=(0, 10),
        )
        shown = latest[
            ["feature", "detector", "p_value", "p_value_corrected", "effect_size", "drift"]
        ].assign(drift=latest["drift"].map({True: "DRIFT", False: "ok"}))
        return pn.Column(caption, table(shown), sizing_mode="stretch_width")

    @param.depends("feature")
    def _distribution(self):
        if self._reference is None:
            self._reference = reference_sample(self.context.settings)
            self._live = self.context.read_models.live_window()
        for side in (self._reference, self._live):
            if isinstance(side, Unavailable):
                return explanation(side)
        return pn.pane.Bokeh(
            charts.distribution_chart(
                self._reference[self.feature],
                self._live[self.feature],
                self.feature,
                categorical=self.feature in self.categorical,
            ),
            sizing_mode="stretch_width",
        )

    def _multivariate(self):
        if isinstance(self.monitoring, Unavailable):
            return explanation(self.monitoring)
        drift = self.monitoring.get("drift")
        if not drift:
            return explanation(
                Unavailable("Multivariate drift", "no drift report has been published yet")
            )
        mmd = drift.get("multivariate") or {}
        if "skipped" in mmd:
            return pn.pane.Alert(f"MMD test skipped: {mmd['skipped']}", alert_type="info")
        flagged = bool(mmd.get("drift"))
        cards = [
            (
                "MMD drift",
                "DRIFT" if flagged else "no drift",
                mmd.get("detector", "mmd"),
                "bad" if flagged else "good",
            ),
            (
                "p-value",
                f"{mmd.get('p_value', float('nan')):.3g}",
                f"threshold {self.threshold}",
                "",
            ),
            (
                "MMD²",
                f"{mmd.get('distance', float('nan')):.3g}",
                f"critical {mmd.get('distance_threshold', float('nan')):.3g}",
                "",
            ),
            ("Sample", f"{mmd.get('sample_rows', 0):,} rows", "per window", ""),
        ]
        return pn.pane.HTML(stat_cards(cards), sizing_mode="stretch_width")

    def _alerts(self):
        if isinstance(self.monitoring, Unavailable):
            return explanation(self.monitoring)
        alerts = open_alerts(self.context.settings, self.monitoring)
        if not alerts:
            return pn.pane.Alert("No open alerts.", alert_type="success")
        return table(pd.DataFrame(alerts))

    def __panel__(self):
        selector = pn.widgets.Select.from_param(self.param.feature, label="Feature", width=260)
        return pn.Column(
            heading("Drift", 2),
            heading("Open alerts"),
            self._alerts(),
            heading(f"Corrected p-values over time (drift below {self.threshold})"),
            self._p_values(),
            heading("Latest report"),
            self._latest_report(),
            heading("Reference vs live distribution"),
            selector,
            self._distribution,
            heading("Multivariate drift (MMD)"),
            self._multivariate(),
            sizing_mode="stretch_width",
        )
