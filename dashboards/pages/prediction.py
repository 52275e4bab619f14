"""Prediction testing: the champion's features in a form (one widget per feature of the contract
it was trained with), the routed answer of the serving API, and the champion's and challenger's
probabilities with their SHAP contributions side by side."""

import panel as pn
import param

from dashboards import charts
from dashboards.forms import FormField, form_fields, validate_features
from dashboards.pages.common import Context, explanation, heading, stat_cards
from dashboards.sources import Unavailable
from dashboards.sources.registry import form_contract, reference_sample

__all__ = ["PredictionPage"]

CARD_STYLE = {"flex": "1 1 320px", "min-width": "0"}


class PredictionPage(pn.viewable.Viewer):
    """Score one customer through the real serving API."""

    customer_id = param.String(default="dashboard-test", doc="Optional; canary routing hashes it.")

    def __init__(self, context: Context, **params) -> None:
        super().__init__(**params)
        self.context = context
        found = form_contract(context.settings)
        self.contract, self.contract_source = found.contract, found.source
        reference = reference_sample(context.settings)
        self.fields = form_fields(
            self.contract, None if isinstance(reference, Unavailable) else reference
        )
        self.labels = {f.name: f.label for f in self.fields}
        self.inputs = {f.name: self._widget(f) for f in self.fields}
        self.customer = pn.widgets.TextInput.from_param(
            self.param.customer_id, label="Customer id (optional)"
        )
        self.submit = pn.widgets.Button(label="Predict", color="primary", width=140)
        self.submit.on_click(self._on_submit)
        self.errors = pn.Column(sizing_mode="stretch_width")
        self.routed = pn.Column(sizing_mode="stretch_width")
        self.compare = pn.FlexBox(sizing_mode="stretch_width", flex_wrap="wrap")

    @staticmethod
    def _widget(field: FormField) -> pn.widgets.Widget:
        """The widget for one contract feature, by its kind."""
        widget: pn.widgets.Widget
        if field.kind == "category":
            widget = pn.widgets.Select(
                label=field.label, options=list(field.options), value=field.default
            )
        elif field.kind == "boolean":
            widget = pn.widgets.Checkbox(label=field.label, value=field.default)
        elif field.kind == "integer":
            widget = pn.widgets.IntInput(
                label=field.label,
                value=field.default,
                start=None if field.start is None else int(field.start),
                end=None if field.end is None else int(field.end),
            )
        else:
            widget = pn.widgets.FloatInput(
                label=field.label, value=field.default, start=field.start, end=field.end, step=1.0
            )
        widget.css_classes = [f"feature-{field.name}", f"feature-kind-{field.kind}"]
        return widget

    def values(self) -> dict:
        return {name: widget.value for name, widget in self.inputs.items()}

    def _on_submit(self, _event=None) -> None:
        check = validate_features(self.values(), self.contract)
        self.routed.objects, self.compare.objects = [], []
        if not check.ok:
            lines = "\n".join(
                f"- **{self.labels.get(name, name)}**: {message}"
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
                "current policy) and explains it with each loaded version (`POST /explain`). "
                f"The form has the features of {self.contract_source}.",
                margin=(0, 10),
                css_classes=["form-contract"],
            ),
            pn.FlexBox(form, results, flex_wrap="wrap", sizing_mode="stretch_width"),
            sizing_mode="stretch_width",
        )
