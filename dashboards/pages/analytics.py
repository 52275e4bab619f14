"""Analytics: calibration (observed churn beside predicted risk over the same horizon, by score
decile and by segment), customer segments by predicted risk, global feature importance.

Observed and predicted rates are only compared where they cover the same horizon: the
``calibration`` read model's. The ``customer_segments`` read model's observed churn is "ever
churned", which no horizon-bound risk should be measured against, so it is not shown beside one.
"""

import pandas as pd
import panel as pn

from dashboards import charts
from dashboards.pages.common import Context, explanation, heading, stat_cards, table
from dashboards.sources import Unavailable

__all__ = ["AnalyticsPage", "calibration_rows"]

TIER_ORDER = ("low", "medium", "high")  # churn_assets.segments.RISK_TIERS


def calibration_rows(calibration: pd.DataFrame, grouping: str) -> pd.DataFrame:
    """The rows of one ``grouping`` ('decile' in numeric order, 'segment' by name) with the gap
    (observed - predicted) and whether it is within the tolerance."""
    rows = calibration.loc[calibration["grouping"] == grouping].copy()
    if grouping == "decile":
        rows = rows.assign(_order=pd.to_numeric(rows["group_label"], errors="coerce"))
    else:
        rows = rows.assign(_order=rows["group_label"].astype(str))
    rows = rows.sort_values("_order").drop(columns="_order").reset_index(drop=True)
    gap = rows["observed_rate"] - rows["predicted_rate"]
    return rows.assign(gap=gap, within=gap.abs() <= rows["tolerance"])


def _points(rate: float) -> str:
    return f"{rate * 100:+.1f} pp"


def _tolerance_text(tolerance: pd.Series) -> str:
    low, high = tolerance.min() * 100, tolerance.max() * 100
    return f"± {low:.1f} pp" if round(low, 1) == round(high, 1) else f"± {low:.1f}–{high:.1f} pp"


class AnalyticsPage(pn.viewable.Viewer):
    """Read models published by the calibration, customer_segments and feature_importance
    assets."""

    def __init__(self, context: Context, **params) -> None:
        super().__init__(**params)
        self.context = context
        self.calibration = context.read_models.calibration()
        self.segments = context.read_models.frame("customer_segments", what="Customer segments")
        self.importance = context.read_models.frame("feature_importance", what="Feature importance")

    # -- calibration ------------------------------------------------------------------------------
    def _calibration(self) -> list[pn.viewable.Viewable]:
        if isinstance(self.calibration, Unavailable):
            return [explanation(self.calibration)]
        frame = self.calibration
        horizon = int(frame["horizon_days"].iloc[0])
        model = str(frame["model_version"].iloc[0])
        deciles = calibration_rows(frame, "decile")
        segments = calibration_rows(frame, "segment")
        parts: list[pn.viewable.Viewable] = [
            pn.pane.HTML(
                stat_cards(self._calibration_cards(deciles, horizon, model)),
                sizing_mode="stretch_width",
                css_classes=["calibration-cards"],
            )
        ]
        if deciles.empty:
            parts.append(
                pn.pane.Alert("No score deciles in the calibration read model.", alert_type="info")
            )
        else:
            parts += [
                heading(f"By score decile ({horizon}-day churn)", 4),
                pn.pane.Bokeh(charts.calibration_chart(deciles), sizing_mode="stretch_width"),
                pn.pane.HTML(charts.calibration_key(), sizing_mode="stretch_width"),
            ]
        if not segments.empty:
            parts += [
                heading(f"By segment ({horizon}-day churn)", 4),
                pn.pane.Bokeh(
                    charts.segment_calibration_chart(segments), sizing_mode="stretch_width"
                ),
                pn.pane.HTML(charts.segment_calibration_key(), sizing_mode="stretch_width"),
            ]
        parts += [
            pn.pane.Markdown(
                self._definitions(frame, deciles, horizon, model),
                margin=(0, 10),
                css_classes=["calibration-definitions"],
            ),
            table(self._calibration_table(pd.concat([deciles, segments], ignore_index=True))),
        ]
        return parts

    @staticmethod
    def _calibration_cards(deciles: pd.DataFrame, horizon: int, model: str):
        cards = [("Horizon", f"{horizon} days", "predicted and observed over the same days", "")]
        if not deciles.empty:
            within = int(deciles["within"].sum())
            worst = deciles.loc[deciles["gap"].abs().idxmax()]
            cards += [
                (
                    "Deciles within tolerance",
                    f"{within} of {len(deciles)}",
                    "observed inside the calibration band",
                    "good" if within == len(deciles) else "warn",
                ),
                (
                    "Largest gap",
                    _points(float(worst["gap"])),
                    f"decile {worst['group_label']}, tolerance ± {worst['tolerance'] * 100:.1f} pp",
                    "good" if worst["within"] else "bad",
                ),
                (
                    "Customers",
                    f"{int(deciles['customers'].sum()):,}",
                    f"scored by {model}",
                    "",
                ),
            ]
        return cards

    @staticmethod
    def _definitions(frame: pd.DataFrame, deciles: pd.DataFrame, horizon: int, model: str):
        order = ""
        if len(deciles) > 1:
            rising = deciles["predicted_rate"].iloc[-1] >= deciles["predicted_rate"].iloc[0]
            first, last = deciles["group_label"].iloc[0], deciles["group_label"].iloc[-1]
            low, high = (first, last) if rising else (last, first)
            order = f" (decile {low} has the lowest predicted risk, {high} the highest)"
        return (
            f"**Predicted**: the mean churn probability that {model} gave the customers of a "
            f"group when it scored them, for churn within {horizon} days. "
            f"**Observed**: the share of those customers who churned within {horizon} days "
            "after they were scored. "
            f"**Tolerance**: the half-width of the calibration error band "
            f"({_tolerance_text(frame['tolerance'])}); a calibrated model keeps each group's "
            "observed rate that close to its predicted rate, inside the shaded band around the "
            "dashed diagonal. "
            f"**Deciles**: customers ranked by predicted risk and cut into ten equal groups"
            f"{order}."
        )

    @staticmethod
    def _calibration_table(rows: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "group": rows["grouping"] + " " + rows["group_label"].astype(str),
                "customers": rows["customers"].map("{:,}".format),
                "predicted": rows["predicted_rate"].map("{:.1%}".format),
                "observed": rows["observed_rate"].map("{:.1%}".format),
                "gap": rows["gap"].map(_points),
                "tolerance": rows["tolerance"].map(lambda t: f"± {t * 100:.1f} pp"),
                "within tolerance": rows["within"].map({True: "yes", False: "no"}),
            }
        )

    # -- segments and importance ------------------------------------------------------------------
    def _tiers(self):
        if isinstance(self.segments, Unavailable):
            return explanation(self.segments)
        tiers = self.segments.loc[self.segments["cohort_type"] == "risk_tier"]
        if tiers.empty:
            return pn.pane.Alert("No risk tiers in the segments read model.", alert_type="info")
        order = {tier: i for i, tier in enumerate(TIER_ORDER)}
        tiers = tiers.assign(_order=tiers["cohort"].map(order)).sort_values("_order")
        share = tiers["customers"] / tiers["customers"].sum()
        shown = pd.DataFrame(
            {
                "risk tier": tiers["cohort"],
                "customers": tiers["customers"],
                "share": share.map("{:.1%}".format),
                "mean predicted risk": tiers["mean_predicted_risk"].map("{:.1%}".format),
            }
        )
        chart = charts.grouped_bars(
            list(tiers["cohort"]), {"share of customers": share.to_numpy()}, y_label="share"
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
        return pn.Column(
            heading("Analytics", 2),
            heading("Calibration: observed vs predicted churn"),
            *self._calibration(),
            heading("Customer segments by predicted risk"),
            self._tiers(),
            heading("Global feature importance"),
            self._importance(),
            sizing_mode="stretch_width",
        )
