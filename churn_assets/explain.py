"""SHAP explanations of the XGBoost model (TreeExplainer), per row and globally.

Contributions are computed on the transformer's output columns and summed back to the model
inputs (the one-hot columns of a categorical feature add up to that feature), which keeps
additivity: base value + sum of contributions = the model's margin (log-odds).
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import shap

from churn_assets.model import ScoringModel

__all__ = ["Explanation", "ShapExplainer"]


@dataclass(frozen=True)
class Explanation:
    probability: float
    margin: float
    base_value: float
    contributions: dict[str, float]  # model input -> contribution to the margin
    model_version: str | None

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        ranked = sorted(self.contributions.items(), key=lambda item: -abs(item[1]))
        return ranked[:k]

    def as_dict(self, k: int = 5) -> dict[str, Any]:
        return {
            "probability": self.probability,
            "margin": self.margin,
            "base_value": self.base_value,
            "model_version": self.model_version,
            "top_contributions": [
                {"feature": name, "contribution": value} for name, value in self.top(k)
            ],
        }


class ShapExplainer:
    """TreeExplainer for a :class:`ScoringModel`; build once, reuse for many rows."""

    def __init__(self, model: ScoringModel) -> None:
        self.model = model
        self._explainer = shap.TreeExplainer(model.booster)
        sources = model.transformer.source_features()
        self.inputs = list(dict.fromkeys(sources))
        # Output column -> model input aggregation matrix.
        self._groups = np.zeros((len(sources), len(self.inputs)))
        for column, source in enumerate(sources):
            self._groups[column, self.inputs.index(source)] = 1.0

    @property
    def base_value(self) -> float:
        value = np.asarray(self._explainer.expected_value, dtype=float).reshape(-1)
        return float(value[0])

    def input_contributions(self, x: np.ndarray) -> np.ndarray:
        """SHAP values per model input, shape (rows, len(self.inputs))."""
        values = np.asarray(self._explainer.shap_values(x), dtype=float)
        return values @ self._groups

    def explain_matrix(self, x: np.ndarray) -> list[Explanation]:
        contributions = self.input_contributions(x)
        margins = self.model.margin_matrix(x)
        probabilities = 1.0 / (1.0 + np.exp(-margins))
        return [
            Explanation(
                probability=float(probabilities[i]),
                margin=float(margins[i]),
                base_value=self.base_value,
                contributions=dict(zip(self.inputs, map(float, contributions[i]), strict=True)),
                model_version=self.model.version,
            )
            for i in range(len(x))
        ]

    def explain_records(self, records: Iterable[Mapping[str, Any]]) -> list[Explanation]:
        return self.explain_matrix(self.model.transformer.transform_records(records))

    def global_importance(self, x: np.ndarray) -> pd.DataFrame:
        """Mean |SHAP| per model input over the rows of ``x``, largest first."""
        mean_abs = np.abs(self.input_contributions(x)).mean(axis=0)
        frame = pd.DataFrame({"feature": self.inputs, "mean_abs_shap": mean_abs})
        return frame.sort_values("mean_abs_shap", ascending=False, ignore_index=True)
