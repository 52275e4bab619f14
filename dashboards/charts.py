"""Bokeh figures for the dashboard pages, built from plain frames (no Panel, no I/O).

Every figure stretches to its container's width so the pages work from phone to desktop widths.
"""

import html
import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
from bokeh.models import (
    ColumnDataSource,
    DatetimeTickFormatter,
    HoverTool,
    Legend,
    LegendItem,
    NumeralTickFormatter,
    Range1d,
    Span,
)
from bokeh.palettes import Category10_10
from bokeh.plotting import figure

__all__ = [
    "bar_chart",
    "calibration_chart",
    "calibration_key",
    "colour_key",
    "contributions_chart",
    "distribution_chart",
    "feature_colours",
    "grouped_bars",
    "key_html",
    "p_value_chart",
    "time_range",
    "rate_chart",
    "segment_calibration_chart",
    "segment_calibration_key",
    "update_rate_chart",
]

HEIGHT = 280
COLOURS = Category10_10
REFERENCE_COLOUR, LIVE_COLOUR = "#4c72b0", "#dd8452"
PREDICTED_COLOUR, OBSERVED_COLOUR, BAND_COLOUR = "#4c72b0", "#dd8452", "#8da0cb"
WITHIN_COLOUR, OUTSIDE_COLOUR = "#2e9d5b", "#c44e52"


def _figure(**kwargs) -> figure:
    fig = figure(
        height=kwargs.pop("height", HEIGHT),
        sizing_mode="stretch_width",
        toolbar_location=None,
        **kwargs,
    )
    fig.outline_line_color = None
    fig.grid.grid_line_alpha = 0.4
    fig.min_border_right = 24  # room for the last tick label (a clock time is wide)
    # Readable on a phone (Bokeh's tick labels default to 11px).
    fig.axis.major_label_text_font_size = "12px"
    fig.axis.axis_label_text_font_size = "13px"
    return fig


# Few enough labels that they do not run into each other on a phone.
TIME_TICKS = 3
TIME_FORMAT, DATE_FORMAT = "%H:%M:%S", "%d %b %Y"
FINE_SCALES = ("microseconds", "milliseconds", "seconds", "minsec")
COARSE_SCALES = ("minutes", "hourmin", "hours")


def _time_axis(fig: figure) -> None:
    """Make ``fig``'s x axis (``x_axis_type="datetime"``) read as clock times with the date
    below them, at every zoom level: Bokeh's default formats fall back to microseconds
    ("585500us") on a range a few milliseconds wide, as one report's is. (A formatter is a
    model of one document, so every figure gets its own.)"""
    context = DatetimeTickFormatter(
        **dict.fromkeys(FINE_SCALES + COARSE_SCALES, DATE_FORMAT), days="%Y", months="", years=""
    )
    fig.xaxis.formatter = DatetimeTickFormatter(
        **dict.fromkeys(FINE_SCALES, TIME_FORMAT),
        **dict.fromkeys(COARSE_SCALES, "%H:%M"),
        days="%d %b",
        months="%b %Y",
        years="%Y",
        context=context,
    )
    fig.xaxis.ticker.desired_num_ticks = TIME_TICKS


def time_range(times: pd.Series, min_span: pd.Timedelta) -> tuple[pd.Timestamp, pd.Timestamp]:
    """A range over ``times`` (tz-naive), padded by 5 %, and at least ``min_span`` wide around
    its middle (so one point sits in the middle of a readable span)."""
    start, end = times.min(), times.max()
    span = max(end - start, pd.Timedelta(0))
    if span < min_span:
        middle = start + span / 2
        return middle - min_span / 2, middle + min_span / 2
    return start - span * 0.05, end + span * 0.05


def p_value_chart(history: pd.DataFrame, threshold: float) -> figure:
    """Corrected p-value per feature over report time (log scale) against the drift threshold:
    one line per feature through its reports. A single report is a column of points in the
    middle of a two-hour axis (the page says that the history builds as reports come)."""
    times = history["computed_at"].dt.tz_convert("UTC").dt.tz_localize(None)
    start, end = time_range(times, pd.Timedelta(hours=2))
    fig = _figure(
        x_axis_type="datetime",
        y_axis_type="log",
        x_axis_label="report time (UTC)",
        y_axis_label="corrected p-value",
        height=320,
        x_range=Range1d(start, end),
    )
    _time_axis(fig)
    floor = 1e-12
    colours = feature_colours(history["feature"])
    frame = history.assign(t=times)
    for feature, rows in frame.groupby("feature", sort=True):
        rows = rows.sort_values("t")
        source = ColumnDataSource(
            {
                "t": rows["t"],
                "p": np.clip(rows["p_value_corrected"].astype(float), floor, 1.0),
                "feature": [feature] * len(rows),
                "drift": rows["drift"].map({True: "yes", False: "no"}),
            }
        )
        colour = colours[feature]
        fig.line("t", "p", source=source, color=colour, line_width=2)
        fig.scatter("t", "p", source=source, color=colour, size=7)
    fig.add_layout(
        Span(location=threshold, dimension="width", line_color="red", line_dash="dashed")
    )
    fig.add_tools(
        HoverTool(
            tooltips=[
                ("feature", "@feature"),
                ("report", "@t{%Y-%m-%d %H:%M:%S} UTC"),
                ("p", "@p{0.0000}"),
                ("drift", "@drift"),
            ],
            formatters={"@t": "datetime"},
        )
    )
    return fig


def feature_colours(features: Iterable[str]) -> dict[str, str]:
    """A stable colour per feature (sorted order), shared by a chart and its HTML key."""
    return {name: COLOURS[i % len(COLOURS)] for i, name in enumerate(sorted(set(features)))}


SWATCHES = {
    "line": "width:14px;height:4px;background:{colour}",
    "dashed": "width:14px;height:0;border-top:2px dashed {colour}",
    "dot": "width:10px;height:10px;border-radius:50%;background:{colour}",
    "diamond": "width:9px;height:9px;transform:rotate(45deg);background:{colour}",
    "band": "width:14px;height:10px;background:{colour};opacity:0.45",
}


def key_html(entries: Iterable[tuple[str, str, str]]) -> str:
    """An HTML key of ``(label, colour, swatch)`` entries (swatch: one of :data:`SWATCHES`)
    that wraps on narrow screens (a Bokeh legend cannot)."""
    items = "".join(
        f'<span style="display:inline-flex;align-items:center;margin:2px 12px 2px 0">'
        f'<span style="{SWATCHES[swatch].format(colour=colour)};margin-right:6px"></span>'
        f"{html.escape(label)}</span>"
        for label, colour, swatch in entries
    )
    return (
        f'<div class="chart-key" style="display:flex;flex-wrap:wrap;font-size:0.8rem">{items}</div>'
    )


def colour_key(colours: dict[str, str]) -> str:
    """An HTML key of one line colour per name (:func:`feature_colours`)."""
    return key_html((name, colour, "line") for name, colour in colours.items())


def calibration_key() -> str:
    """The key of :func:`calibration_chart`."""
    return key_html(
        [
            ("decile inside its tolerance", WITHIN_COLOUR, "dot"),
            ("outside", OUTSIDE_COLOUR, "dot"),
            ("predicted = observed", "#555", "dashed"),
            ("tolerance band", BAND_COLOUR, "band"),
        ]
    )


def segment_calibration_key() -> str:
    """The key of :func:`segment_calibration_chart`."""
    return key_html(
        [
            ("predicted", PREDICTED_COLOUR, "diamond"),
            ("observed", OBSERVED_COLOUR, "dot"),
            ("tolerance around predicted", BAND_COLOUR, "band"),
        ]
    )


def distribution_chart(
    reference: pd.Series, live: pd.Series, feature: str, categorical: bool
) -> figure:
    """Reference vs live distribution of one feature: shares per category, or density
    histograms on shared bins."""
    if categorical:
        # As text: a boolean's True/False are categories too, and Bokeh's factors are strings.
        reference, live = reference.dropna().astype(str), live.dropna().astype(str)
        categories = sorted(set(reference) | set(live))
        ref_share = reference.value_counts(normalize=True).reindex(categories, fill_value=0)
        live_share = live.value_counts(normalize=True).reindex(categories, fill_value=0)
        return grouped_bars(
            categories,
            {"reference": ref_share.to_numpy(), "live": live_share.to_numpy()},
            y_label=f"share of rows ({feature})",
            colours=(REFERENCE_COLOUR, LIVE_COLOUR),
        )
    values = np.concatenate([reference.to_numpy(float), live.to_numpy(float)])
    edges = np.histogram_bin_edges(values[np.isfinite(values)], bins=30)
    fig = _figure(x_axis_label=feature, y_axis_label="density")
    for series, colour, label in (
        (reference, REFERENCE_COLOUR, "reference"),
        (live, LIVE_COLOUR, "live"),
    ):
        density, _ = np.histogram(series.to_numpy(float), bins=edges, density=True)
        fig.quad(
            top=density,
            bottom=0,
            left=edges[:-1],
            right=edges[1:],
            fill_color=colour,
            fill_alpha=0.45,
            line_color=colour,
            legend_label=f"{label} ({len(series):,} rows)",
        )
    fig.legend.location = "top_right"
    fig.legend.label_text_font_size = "12px"
    return fig


def grouped_bars(
    categories: Sequence[str],
    series: dict[str, np.ndarray],
    *,
    y_label: str,
    colours: Sequence[str] | None = None,
    percent: bool = True,
) -> figure:
    """Side-by-side vertical bars: one group per category, one bar per series."""
    from bokeh.transform import dodge

    categories = [str(c) for c in categories]
    names = list(series)
    data = {"category": categories, **{name: list(values) for name, values in series.items()}}
    fig = _figure(x_range=categories, y_axis_label=y_label)
    width = 0.8 / max(len(names), 1)
    colours = colours or COLOURS
    items = []
    for index, name in enumerate(names):
        offset = (index - (len(names) - 1) / 2) * width
        renderer = fig.vbar(
            x=dodge("category", offset, range=fig.x_range),
            top=name,
            width=width * 0.95,
            source=ColumnDataSource(data),
            color=colours[index % len(colours)],
        )
        items.append(LegendItem(label=name, renderers=[renderer]))
    if len(items) > 1:  # outside the plot, so it never hides a bar
        fig.add_layout(
            Legend(items=items, orientation="horizontal", label_text_font_size="12px"), "above"
        )
    fig.y_range.start = 0
    fig.xaxis.major_label_orientation = math.pi / 6 if len(categories) > 4 else 0
    fig.add_tools(
        HoverTool(
            tooltips=[("", "@category")]
            + [(n, f"@{{{n}}}{{{'0.0%' if percent else '0.000'}}}") for n in names]
        )
    )
    return fig


def bar_chart(labels: Sequence[str], values: Sequence[float], x_label: str) -> figure:
    """Horizontal bars, largest at the top."""
    order = list(np.argsort(values))
    labels = [str(labels[i]) for i in order]
    values = [float(values[i]) for i in order]
    fig = _figure(y_range=labels, x_axis_label=x_label, height=max(180, 28 * len(labels) + 60))
    fig.hbar(y=labels, right=values, height=0.7, color=REFERENCE_COLOUR)
    fig.x_range.start = 0
    return fig


def contributions_chart(contributions: Sequence[dict], title: str) -> figure:
    """SHAP contributions (log-odds) of one prediction: red raises churn risk, blue lowers it."""
    ordered = sorted(contributions, key=lambda c: abs(c["contribution"]))
    labels = [c["feature"] for c in ordered]
    values = [float(c["contribution"]) for c in ordered]
    colours = ["#c44e52" if v > 0 else "#4c72b0" for v in values]
    fig = _figure(
        y_range=labels,
        title=title,
        x_axis_label="SHAP contribution (log-odds)",
        height=max(200, 30 * len(labels) + 70),
    )
    fig.hbar(y=labels, left=0, right=values, height=0.7, color=colours)
    fig.add_layout(Span(location=0, dimension="height", line_color="#555"))
    return fig


def rate_chart(source: ColumnDataSource) -> figure:
    """Requests per second (columns ``t``, ``rate``), with explicit ranges that
    :func:`update_rate_chart` moves, so an empty chart needs no data to lay out."""
    now = pd.Timestamp.now()
    fig = _figure(
        x_axis_type="datetime",
        y_axis_label="requests/s",
        height=200,
        x_range=Range1d(now - pd.Timedelta(minutes=1), now),
        y_range=Range1d(0, 1),
    )
    _time_axis(fig)
    fig.line("t", "rate", source=source, line_width=2, color=REFERENCE_COLOUR)
    fig.scatter("t", "rate", source=source, size=5, color=REFERENCE_COLOUR)
    return fig


def update_rate_chart(
    fig: figure, source: ColumnDataSource, samples: Sequence[tuple[pd.Timestamp, float]]
) -> None:
    """Show ``samples`` (time, requests/s) in a chart made by :func:`rate_chart`."""
    if not samples:
        return
    times = [t for t, _ in samples]
    rates = [r for _, r in samples]
    source.data = {"t": times, "rate": rates}
    fig.x_range.start = min(times[0], times[-1] - pd.Timedelta(minutes=1))
    fig.x_range.end = times[-1]
    fig.y_range.end = max(1.0, max(rates) * 1.2)


def _rate_axes(fig: figure, *axes: str) -> None:
    for axis in axes:
        getattr(fig, axis).formatter = NumeralTickFormatter(format="0%")


def calibration_chart(deciles: pd.DataFrame) -> figure:
    """Observed against predicted churn rate per score decile (a reliability diagram): the
    dashed diagonal is perfect calibration, the shaded band each decile's tolerance around it;
    a decile's point is green inside its band, red outside (key: :func:`calibration_key`).
    Columns as in the ``calibration`` read model."""
    rows = deciles.assign(decile=deciles["group_label"].astype(str)).sort_values("predicted_rate")
    predicted = rows["predicted_rate"].to_numpy(float)
    observed = rows["observed_rate"].to_numpy(float)
    tolerance = rows["tolerance"].to_numpy(float)
    within = np.abs(observed - predicted) <= tolerance
    top = max(0.01, float(np.nanmax(np.r_[predicted + tolerance, observed])) * 1.08)
    fig = _figure(
        x_axis_label="predicted churn rate (mean risk)",
        y_axis_label="observed churn rate",
        x_range=Range1d(0, top),
        y_range=Range1d(0, top),
        height=340,
    )
    _rate_axes(fig, "xaxis", "yaxis")
    fig.varea(
        x=predicted,
        y1=np.clip(predicted - tolerance, 0, None),
        y2=predicted + tolerance,
        fill_color=BAND_COLOUR,
        fill_alpha=0.3,
    )
    fig.line([0, top], [0, top], line_color="#555", line_dash="dashed")
    source = ColumnDataSource(
        {
            "predicted": predicted,
            "observed": observed,
            "tolerance": tolerance,
            "decile": rows["decile"].to_list(),
            "customers": rows["customers"].to_numpy(int),
            "colour": np.where(within, WITHIN_COLOUR, OUTSIDE_COLOUR),
        }
    )
    points = fig.scatter("predicted", "observed", source=source, size=9, color="colour")
    fig.text(
        "predicted",
        "observed",
        text="decile",
        source=source,
        x_offset=6,
        y_offset=-4,
        text_font_size="9pt",
        text_color="#333",
    )
    fig.add_tools(
        HoverTool(
            renderers=[points],
            tooltips=[
                ("decile", "@decile"),
                ("customers", "@customers{0,0}"),
                ("predicted", "@predicted{0.0%}"),
                ("observed", "@observed{0.0%}"),
                ("tolerance", "± @tolerance{0.0%}"),
            ],
        )
    )
    return fig


def segment_calibration_chart(segments: pd.DataFrame) -> figure:
    """Per segment, predicted (diamond) and observed (circle) churn rate over the same horizon,
    with the tolerance band around the predicted rate (key: :func:`segment_calibration_key`).
    Columns as in the ``calibration`` read model."""
    rows = segments.assign(segment=segments["group_label"].astype(str)).sort_values("segment")
    labels = rows["segment"].to_list()
    predicted = rows["predicted_rate"].to_numpy(float)
    observed = rows["observed_rate"].to_numpy(float)
    tolerance = rows["tolerance"].to_numpy(float)
    source = ColumnDataSource(
        {
            "segment": labels,
            "predicted": predicted,
            "observed": observed,
            "low": np.clip(predicted - tolerance, 0, None),
            "high": predicted + tolerance,
            "tolerance": tolerance,
            "customers": rows["customers"].to_numpy(int),
        }
    )
    fig = _figure(
        y_range=labels[::-1],
        x_axis_label="churn rate over the horizon",
        height=max(200, 36 * len(labels) + 110),
    )
    _rate_axes(fig, "xaxis")
    fig.hbar(
        y="segment",
        left="low",
        right="high",
        height=0.5,
        source=source,
        fill_color=BAND_COLOUR,
        fill_alpha=0.3,
        line_color=None,
    )
    marks = fig.scatter(
        "predicted", "segment", source=source, marker="diamond", size=14, color=PREDICTED_COLOUR
    )
    dots = fig.scatter("observed", "segment", source=source, size=10, color=OBSERVED_COLOUR)
    fig.x_range.start = 0
    fig.add_tools(
        HoverTool(
            renderers=[marks, dots],
            tooltips=[
                ("segment", "@segment"),
                ("customers", "@customers{0,0}"),
                ("predicted", "@predicted{0.0%}"),
                ("observed", "@observed{0.0%}"),
                ("tolerance", "± @tolerance{0.0%}"),
            ],
        )
    )
    return fig
