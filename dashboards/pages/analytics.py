"""Analytics: customer segments by predicted risk, churn by cohort, global feature importance."""

import pandas as pd
import panel as pn
import param

from dashboards import charts
from dashboards.data import Unavailable
from dashboards.pages.common import Context, explanation, heading, table

__all__ = ["AnalyticsPage"]

COHORTS = {
    "contract_type": "Contract",
    "tenure_band": "Tenure (months)",
    "payment_method": "Payment method",
}
TIER_ORDER = ("low", "medium", "high")  # churn_assets.segments.RISK_TIERS


class AnalyticsPage(pn.viewable.Viewer):
    """Read models published by the customer_segments and feature_importance assets."""

    cohort = param.Selector(
        default="contract_type", objects=list(COHORTS), doc="Cohort to compare churn across."
    )

    def __init__(self, context: Context, **params) -> None:
        super().__init__(**params)
        self.context = context
        self.segments = context.read_models.frame("customer_segments", what="Customer segments")
        self.importance = context.read_models.frame("feature_importance", what="Feature importance")

    def _cohort_frame(self, cohort_type: str) -> pd.DataFrame:
        assert not isinstance(self.segments, Unavailable)
        rows = self.segments.loc[self.segments["cohort_type"] == cohort_type]
        if cohort_type == "risk_tier":
            order = {tier: i for i, tier in enumerate(TIER_ORDER)}
            rows = rows.assign(_order=rows["cohort"].map(order)).sort_values("_order")
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
            return pn.pane.Alert(f"No {COHORTS[self.cohort]} cohorts published.", alert_type="info")
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
            self.param.cohort, label="Cohort", options={v: k for k, v in COHORTS.items()}, width=260
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
