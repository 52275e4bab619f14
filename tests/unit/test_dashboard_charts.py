"""The dashboard's charts and page pieces without a browser: time axes that read as times,
report history with one report and with many, the calibration charts' geometry, and the
Retrain button without an admin token."""

import pandas as pd
import panel as pn
import pytest
from bokeh.models import DatetimeTickFormatter, Range1d

from churn_assets.config import load_settings
from dashboards import charts
from tests.serving_fixtures import free_port

pytestmark = pytest.mark.unit


def _history(times: list[str]) -> pd.DataFrame:
    rows = []
    for index, at in enumerate(times):
        for feature, p in (("tenure", 0.4), ("charges", 1e-6)):
            rows.append(
                {
                    "report_id": f"r{index}",
                    "computed_at": pd.Timestamp(at, tz="UTC"),
                    "feature": feature,
                    "p_value_corrected": p,
                    "drift": p < 0.05,
                }
            )
    return pd.DataFrame(rows)


def _formats(formatter: DatetimeTickFormatter) -> dict[str, str]:
    scales = ("microseconds", "milliseconds", "seconds", "minsec", "minutes", "hourmin", "hours")
    return {scale: getattr(formatter, scale) for scale in scales}


def test_one_report_sits_on_a_readable_two_hour_time_axis():
    """A single report's range is zero wide; Bokeh's default formats then label ticks in
    microseconds ("585500us"). The axis spans two hours around the report, in clock times."""
    fig = charts.p_value_chart(_history(["2026-11-30T13:51:43.585500"]), 0.05)
    assert isinstance(fig.x_range, Range1d)
    start, end = pd.Timestamp(fig.x_range.start), pd.Timestamp(fig.x_range.end)
    assert (start, end) == (
        pd.Timestamp("2026-11-30T12:51:43.585500"),
        pd.Timestamp("2026-11-30T14:51:43.585500"),
    )
    formatter = fig.xaxis[0].formatter
    assert set(_formats(formatter).values()) == {"%H:%M:%S", "%H:%M"}
    assert set(_formats(formatter.context).values()) == {"%d %b %Y"}
    assert fig.xaxis[0].axis_label == "report time (UTC)"


def test_report_history_is_one_line_per_feature_over_report_time():
    history = _history(["2026-11-30T06:00", "2026-11-30T10:00", "2026-11-30T14:00"])
    fig = charts.p_value_chart(history, 0.05)
    start, end = pd.Timestamp(fig.x_range.start), pd.Timestamp(fig.x_range.end)
    assert start == pd.Timestamp("2026-11-30T05:36") and end == pd.Timestamp("2026-11-30T14:24")
    lines = [r for r in fig.renderers if type(r.glyph).__name__ == "Line"]
    assert len(lines) == 2
    for line in lines:
        times = pd.to_datetime(line.data_source.data["t"])
        assert list(times) == sorted(times) and len(times) == 3


def test_every_time_axis_formats_clock_times():
    from bokeh.models import ColumnDataSource

    fig = charts.rate_chart(ColumnDataSource({"t": [], "rate": []}))
    assert set(_formats(fig.xaxis[0].formatter).values()) == {"%H:%M:%S", "%H:%M"}


def test_calibration_chart_draws_the_diagonal_and_the_tolerance_band():
    deciles = pd.DataFrame(
        {
            "group_label": ["2", "1"],
            "customers": [50, 50],
            "predicted_rate": [0.30, 0.10],
            "observed_rate": [0.45, 0.12],
            "tolerance": [0.05, 0.03],
        }
    )
    fig = charts.calibration_chart(deciles)
    glyphs = {type(r.glyph).__name__: r.data_source.data for r in fig.renderers}
    band = glyphs["VArea"]
    assert list(band["x"]) == [0.10, 0.30]  # by predicted rate
    assert list(band["y1"]) == pytest.approx([0.07, 0.25])
    assert list(band["y2"]) == pytest.approx([0.13, 0.35])
    diagonal = glyphs["Line"]
    assert list(diagonal["x"]) == list(diagonal["y"]) == [0, fig.x_range.end]
    points = glyphs["Scatter"]
    assert list(points["decile"]) == ["1", "2"]
    # Decile 2 is 15 points off with a 5-point tolerance: red; decile 1 within: green.
    assert list(points["colour"]) == [charts.WITHIN_COLOUR, charts.OUTSIDE_COLOUR]
    assert fig.x_range.end == fig.y_range.end == pytest.approx(0.45 * 1.08)


def test_retrain_is_disabled_with_the_reason_without_an_admin_token(config_factory, monkeypatch):
    from dashboards.pages.common import Context
    from dashboards.pages.models import ModelsPage

    monkeypatch.delenv("CHURN_ADMIN_TOKEN", raising=False)
    settings = load_settings(config_factory(serving={"http_port": free_port()}))
    page = ModelsPage(Context.from_settings(settings))
    assert page.retrain_button.disabled
    notes = [alert.object for alert in page.retrain_result.select(pn.pane.Alert)]
    assert notes == [
        "Retraining is disabled: CHURN_ADMIN_TOKEN is not set in the dashboard's environment "
        "(the serving admin API needs it)."
    ]
    refused = page.context.serving.retrain("because")
    assert not refused.ok and "CHURN_ADMIN_TOKEN" in refused.message


def test_retrain_without_a_reason_sends_nothing(config_factory, monkeypatch):
    import asyncio

    from dashboards.pages.common import Context
    from dashboards.pages.models import ModelsPage

    monkeypatch.setenv("CHURN_ADMIN_TOKEN", "secret")
    settings = load_settings(config_factory(serving={"http_port": free_port()}))
    page = ModelsPage(Context.from_settings(settings))
    assert not page.retrain_button.disabled
    asyncio.run(page._retrain())
    notes = [alert.object for alert in page.retrain_result.select(pn.pane.Alert)]
    assert notes == ["Give a reason for retraining first."]
    # Nothing listens on the port: a reason makes the call, which explains the dead server.
    page.retrain_reason.value_input = "drift"
    asyncio.run(page._retrain())
    notes = [alert.object for alert in page.retrain_result.select(pn.pane.Alert)]
    assert len(notes) == 1 and notes[0].startswith("Retraining not launched: Serving API")
    assert "does not answer" in notes[0] and "secret" not in notes[0]
    assert not page.retrain_button.disabled
