"""Small PNG plots embedded in Dagster metadata as Markdown images."""

import base64
import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["bar_chart_markdown", "calibration_markdown", "markdown_table"]


def _markdown_image(figure: plt.Figure, title: str) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(figure)
    encoded = base64.b64encode(buffer.getvalue()).decode()
    return f"![{title}](data:image/png;base64,{encoded})"


def calibration_markdown(curves: dict[str, list[dict[str, float]]]) -> str:
    """Reliability diagram: observed churn rate against mean prediction, one line per model."""
    figure, axis = plt.subplots(figsize=(4, 4))
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    top = 0.0
    for name, curve in curves.items():
        xs = [point["mean_predicted"] for point in curve]
        ys = [point["observed_rate"] for point in curve]
        top = max(top, *xs, *ys)
        axis.plot(xs, ys, marker="o", label=name)
    axis.set_xlim(0, min(1, top * 1.1 + 0.01))
    axis.set_ylim(0, min(1, top * 1.1 + 0.01))
    axis.set_xlabel("mean predicted churn")
    axis.set_ylabel("observed churn rate")
    axis.legend()
    return _markdown_image(figure, "calibration")


def bar_chart_markdown(labels: Sequence[str], values: Sequence[float], title: str) -> str:
    figure, axis = plt.subplots(figsize=(5, 0.35 * len(labels) + 1))
    axis.barh(list(labels)[::-1], list(values)[::-1])
    axis.set_title(title)
    return _markdown_image(figure, title)


def markdown_table(rows: Sequence[dict[str, object]]) -> str:
    if not rows:
        return "(no rows)"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row[c]) for c in columns) + " |")
    return "\n".join(lines)
