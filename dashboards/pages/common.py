"""Shared pieces of the pages: the session context, explanation panels, tables and stat cards."""

import html
from collections.abc import Iterable
from dataclasses import dataclass

import pandas as pd
import panel as pn

from churn_assets.config import Settings
from dashboards.sources import Unavailable
from dashboards.sources.read_models import ReadModels
from dashboards.sources.serving import ServingClient

__all__ = ["Context", "explanation", "heading", "stat_cards", "table"]

# A wide table scrolls sideways inside its own box, never the page. Panel's ``.panel-df`` rules
# are more specific than bare ``td``, hence the class in each selector. Cells keep to one line,
# except a long-text last column (``table(..., wrap_last=True)``), which wraps once it has 20em.
TABLE_CSS = """
:host { overflow-x: auto; max-width: 100%; }
table.panel-df { border-collapse: collapse; font-size: 0.85rem; width: 100%; }
.panel-df th, .panel-df td { padding: 4px 8px; border-bottom: 1px solid #e3e3e3;
                             text-align: left !important; white-space: nowrap; }
:host(.wrap-last) .panel-df td:last-child { white-space: normal; min-width: 20em; }
.panel-df th { background: #f5f7fa; }
"""

CARDS_CSS = """
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: 10px; }
.card { border: 1px solid #dde3ea; border-radius: 8px; padding: 10px 12px; background: #fff; }
.card .label { font-size: 0.75rem; color: #5f6b7a; text-transform: uppercase; }
.card .value { font-size: 1.4rem; font-weight: 600; margin-top: 2px; overflow-wrap: anywhere; }
.card .note { font-size: 0.75rem; color: #5f6b7a; }
.card.good { border-left: 5px solid #2e9d5b; }
.card.bad { border-left: 5px solid #c44e52; }
.card.warn { border-left: 5px solid #e0a800; }
"""


@dataclass
class Context:
    """What a page needs, built once per browser session."""

    settings: Settings
    read_models: ReadModels
    serving: ServingClient

    @classmethod
    def from_settings(cls, settings: Settings) -> "Context":
        return cls(settings, ReadModels(settings), ServingClient.from_settings(settings))


def explanation(unavailable: Unavailable) -> pn.pane.Alert:
    """A panel that says what is missing and why, in place of the content."""
    text = f"**{unavailable.source}** is unavailable: {unavailable.reason}."
    if unavailable.hint:
        text += f" {unavailable.hint}"
    return pn.pane.Alert(text, alert_type="warning", sizing_mode="stretch_width")


def heading(text: str, level: int = 3) -> pn.pane.Markdown:
    return pn.pane.Markdown(f"{'#' * level} {text}", margin=(10, 10, 0, 10))


def table(frame: pd.DataFrame, *, wrap_last: bool = False, **kwargs) -> pn.pane.DataFrame:
    """``frame`` as an HTML table that scrolls sideways in its own box when it is wider than
    the page; ``wrap_last`` lets a long-text last column wrap."""
    return pn.pane.DataFrame(
        frame,
        index=False,
        sizing_mode="stretch_width",
        stylesheets=[TABLE_CSS],
        css_classes=["wrap-last"] if wrap_last else [],
        float_format=lambda v: f"{v:.4g}",
        na_rep="—",
        **kwargs,
    )


def stat_cards(cards: Iterable[tuple[str, str, str, str]]) -> str:
    """HTML for a responsive grid of ``(label, value, note, status)`` cards; ``status`` is
    ``good``, ``bad``, ``warn`` or empty."""
    items = "".join(
        f'<div class="card {html.escape(status)}" data-label="{html.escape(label)}">'
        f'<div class="label">{html.escape(label)}</div>'
        f'<div class="value">{html.escape(value)}</div>'
        f'<div class="note">{html.escape(note)}</div></div>'
        for label, value, note, status in cards
    )
    return f'<style>{CARDS_CSS}</style><div class="cards">{items}</div>'
