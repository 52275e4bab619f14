"""Analytics: customer segments by predicted risk, churn by cohort, global feature importance.

The cohorts are those the customer_segments asset published (churn_assets.segments: the
contract's category and boolean features and bands of its first integer feature), labelled from
the champion's contract."""

import re

import pandas as pd
import panel as pn
import param

from churn_assets.contract import Contract
from churn_assets.segments import BAND_SUFFIX, RISK_TIER, cohort_types
from dashboards import charts
from dashboards.forms import feature_label
from dashboards.pages.common import Context, explanation, heading, table
from dashboards.sources import Unavailable
from dashboards.sources.registry import form_contract

__all__ = ["AnalyticsPage", "cohort_labels"]

TIER_ORDER = ("low", "medium", "high")  # churn_assets.segments.RISK_TIERS
BAND_START = re.compile(r"^(-?\d+)")


def cohort_labels(types: list[str], contract: Contract) -> dict[str, str]:
    """Cohort type -> its label: the feature's label, ``(bands)`` added for a banded one."""
    labels = {}
    for cohort_type in types:
        name = cohort_type.removesuffix(BAND_SUFFIX)
        try:
            label = feature_label(contract.feature(name))
        except KeyError:
            label = name.replace("_", " ").capitalize()
        labels[cohort_type] = f"{label} (bands)" if name != cohort_type else label
    return labels


class AnalyticsPage(pn.viewable.Viewer):
    """Read models published by the customer_segments and feature_importance assets."""

    cohort = param.Selector(doc="Cohort to compare churn across.")

    def __init__(self, context: Context, **params) -> None:
        super().__init__(**params)
        self.context = context
        self.segments = context.read_models.frame("customer_segments", what="Customer segments")
        self.importance = context.read_models.frame("feature_importance", what="Feature importance")
        contract = form_contract(context.settings).contract
        if isinstance(self.segments, Unavailable):
            types = list(cohort_types(contract))
        else:
            types = list(dict.fromkeys(self.segments["cohort_type"]))
        types = [t for t in types if t != RISK_TIER] or ["none"]
        self.labels = cohort_labels(types, contract)
        self.param.cohort.objects = types
        self.cohort = types[0]

    def _cohort_frame(self, cohort_type: str) -> pd.DataFrame:
        assert not isinstance(self.segments, Unavailable)
        rows = self.segments.loc[self.segments["cohort_type"] == cohort_type]
        if cohort_type == RISK_TIER:
            order = {tier: i for i, tier in enumerate(TIER_ORDER)}
            rows = rows.assign(_order=rows["cohort"].map(order)).sort_values("_order")
        elif cohort_type.endswith(BAND_SUFFIX):
            starts = rows["cohort"].astype(str).str.extract(BAND_START, expand=False)
            rows = rows.assign(_order=pd.to_numeric(starts, errors="coerce")).sort_values("_order")
        else:
            rows = rows.sort_values("cohort")
        return rows.reset_index(drop=True)

    def _tiers(self):
        if isinstance(self.segments, Unavailable):
            return explanation(self.segments)
        tiers = self._cohort_frame("risk_tier")
        if tiers.empty:
            return pn.pane.Alert("No risk tiers in the segments read model.", alert_type="info")
        shown = tiers[["cohort", "customers", "observed_churn_rate", "mean_predicted_risk"]]
        shown = shown.assign(share=tiers["customers"] / tiers["customers"].sum()).rename(
            columns={"cohort": "risk tier"}
        )
        chart = charts.grouped_bars(
            list(tiers["cohort"]),
            {"share of customers": shown["share"].to_numpy()},
            y_label="share of customers",
        )
        return pn.Column(
            pn.pane.Markdown(
                f"Scored by {tiers['model_version'].iloc[0]} on the latest features of "
                f"{int(tiers['customers'].sum()):,} customers.",
                margin=(0, 10),
            ),
            pn.pane.Bokeh(chart, sizing_mode="stretch_width"),
            table(shown),
            sizing_mode="stretch_width",
        )

    @param.depends("cohort")
    def _cohorts(self):
        if isinstance(self.segments, Unavailable):
            return explanation(self.segments)
        rows = self._cohort_frame(self.cohort)
        if rows.empty:
            label = self.labels.get(self.cohort, self.cohort)
            return pn.pane.Alert(f"No {label} cohorts published.", alert_type="info")
        chart = charts.grouped_bars(
            list(rows["cohort"]),
            {
                "observed churn": rows["observed_churn_rate"].to_numpy(),
                "mean predicted risk": rows["mean_predicted_risk"].to_numpy(),
            },
            y_label="churn rate",
        )
        return pn.pane.Bokeh(chart, sizing_mode="stretch_width")

    def _importance(self):
        if isinstance(self.importance, Unavailable):
            return explanation(self.importance)
        frame = self.importance
        return pn.Column(
            pn.pane.Markdown(
                f"Mean |SHAP| (log-odds) of {frame['model_version'].iloc[0]} on its test holdout.",
                margin=(0, 10),
            ),
            pn.pane.Bokeh(
                charts.bar_chart(
                    list(frame["feature"]), list(frame["mean_abs_shap"]), "mean |SHAP| (log-odds)"
                ),
                sizing_mode="stretch_width",
            ),
            sizing_mode="stretch_width",
        )

    def __panel__(self):
        selector = pn.widgets.Select.from_param(
            self.param.cohort,
            label="Cohort",
            options={label: key for key, label in self.labels.items()},
            width=260,
        )
        return pn.Column(
            heading("Analytics", 2),
            heading("Customer segments by predicted risk"),
            self._tiers(),
            heading("Churn by cohort: observed vs predicted"),
            selector,
            self._cohorts,
            heading("Global feature importance"),
            self._importance(),
            sizing_mode="stretch_width",
        )
