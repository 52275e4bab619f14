"""Prediction testing: the eight features in a form, the routed answer of the serving API, and
the champion's and challenger's probabilities with their SHAP contributions side by side."""

import panel as pn
import param

from churn_assets.schemas import CATEGORY_VALUES, FEATURE_NAMES
from dashboards import charts
from dashboards.data import (
    DEFAULT_FEATURES,
    FEATURE_LABELS,
    Unavailable,
    validate_features,
)
from dashboards.pages.common import Context, explanation, heading, stat_cards

__all__ = ["PredictionPage"]

CARD_STYLE = {"flex": "1 1 320px", "min-width": "0"}


class PredictionPage(pn.viewable.Viewer):
    """Score one customer through the real serving API."""

    customer_id = param.String(default="dashboard-test", doc="Optional; canary routing hashes it.")

    def __init__(self, context: Context, **params) -> None:
        super().__init__(**params)
        self.context = context
        self.inputs = self._inputs()
        self.customer = pn.widgets.TextInput.from_param(
            self.param.customer_id, label="Customer id (optional)"
        )
        self.submit = pn.widgets.Button(label="Predict", color="primary", width=140)
        self.submit.on_click(self._on_submit)
        self.errors = pn.Column(sizing_mode="stretch_width")
        self.routed = pn.Column(sizing_mode="stretch_width")
        self.compare = pn.FlexBox(sizing_mode="stretch_width", flex_wrap="wrap")

    @staticmethod
    def _inputs() -> dict[str, pn.widgets.Widget]:
        widgets: dict[str, pn.widgets.Widget] = {}
        for name in FEATURE_NAMES:
            label, value = FEATURE_LABELS[name], DEFAULT_FEATURES[name]
            if name in CATEGORY_VALUES:
                widget = pn.widgets.Select(
                    label=label, options=list(CATEGORY_VALUES[name]), value=value
                )
            elif isinstance(value, int):
                widget = pn.widgets.IntInput(label=label, value=value, start=0)
            else:
                widget = pn.widgets.FloatInput(label=label, value=value, start=0.0, step=1.0)
            widget.css_classes = [f"feature-{name}"]
            widgets[name] = widget
        return widgets

    def values(self) -> dict:
        return {name: widget.value for name, widget in self.inputs.items()}

    def _on_submit(self, _event=None) -> None:
        check = validate_features(self.values())
        self.routed.objects, self.compare.objects = [], []
        if not check.ok:
            lines = "\n".join(
                f"- **{FEATURE_LABELS.get(name, name)}**: {message}"
                for name, message in check.errors.items()
            )
            self.errors.objects = [
                pn.pane.Alert(
                    f"Please correct the form:\n\n{lines}",
                    alert_type="danger",
                    css_classes=["form-errors"],
                )
            ]
            return
        self.errors.objects = []
        serving = self.context.serving
        customer = self.customer_id.strip() or None
        answer = serving.predict(check.features, customer)
        if isinstance(answer, Unavailable):
            self.routed.objects = [explanation(answer)]
            return
        self.routed.objects = [self._routed_card(answer)]
        metrics = serving.router_metrics()
        versions = [answer["model_version"]]
        if not isinstance(metrics, Unavailable):
            state = metrics["state"]
            versions = [v for v in (state["champion"], state["challenger"]) if v]
        self.compare.objects = [
            self._version_card(version, serving.explain(check.features, version, customer))
            for version in versions
        ]

    @staticmethod
    def _routed_card(answer: dict) -> pn.pane.HTML:
        probability = answer["probability"]
        outlier = answer.get("outlier_score")
        cards = [
            (
                "Churn probability",
                f"{probability:.2%}",
                f"p = {probability:.6f}",
                "bad" if probability >= 0.5 else "good",
            ),
            ("Answered by", answer["model_version"], f"arm: {answer['arm']}", ""),
            (
                "Outlier score",
                "—" if outlier is None else f"{outlier:.2f}",
                "flagged" if answer.get("is_outlier") else "not flagged",
                "warn" if answer.get("is_outlier") else "",
            ),
            ("Latency", f"{answer['latency_ms']:.1f} ms", answer["request_id"][:12], ""),
        ]
        return pn.pane.HTML(
            stat_cards(cards), sizing_mode="stretch_width", css_classes=["routed-answer"]
        )

    @staticmethod
    def _version_card(version: str, explained) -> pn.Column:
        if isinstance(explained, Unavailable):
            body = explanation(explained)
        else:
            body = pn.Column(
                pn.pane.Markdown(
                    f"**{version}**: churn probability **{explained['probability']:.2%}** "
                    f"(base value {explained['base_value']:.3f} log-odds)"
                ),
                pn.pane.Bokeh(
                    charts.contributions_chart(
                        explained["top_contributions"], f"{version}: SHAP contributions"
                    ),
                    sizing_mode="stretch_width",
                ),
                sizing_mode="stretch_width",
            )
        return pn.Column(body, styles=CARD_STYLE, css_classes=[f"version-{version}"])

    def __panel__(self):
        form = pn.Column(
            *self.inputs.values(),
            self.customer,
            self.submit,
            styles={"flex": "1 1 280px", "max-width": "420px"},
        )
        results = pn.Column(
            self.errors,
            self.routed,
            heading("Champion and challenger side by side"),
            self.compare,
            styles={"flex": "3 1 320px", "min-width": "0"},
        )
        return pn.Column(
            heading("Prediction testing", 2),
            pn.pane.Markdown(
                "Scores one customer through the serving API (`POST /predict`, routed by the "
                "current policy) and explains it with each loaded version (`POST /explain`).",
                margin=(0, 10),
            ),
            pn.FlexBox(form, results, flex_wrap="wrap", sizing_mode="stretch_width"),
            sizing_mode="stretch_width",
        )
