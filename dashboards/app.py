"""The churn-platform dashboard: ``panel serve dashboards/app.py`` (or ``churn dashboard``).

One app with five pages chosen by ``?page=``; a navigation bar that wraps on narrow screens.
Settings come from ``$CHURN_CONFIG`` (or ``config/config.yaml``) via ``load_settings``.
"""

import logging

import panel as pn

from churn_assets.config import ConfigError, load_settings
from dashboards.pages.analytics import AnalyticsPage
from dashboards.pages.common import Context
from dashboards.pages.drift import DriftPage
from dashboards.pages.models import ModelsPage
from dashboards.pages.monitoring import MonitoringPage
from dashboards.pages.prediction import PredictionPage

__all__ = ["PAGES", "build"]

log = logging.getLogger(__name__)

PAGES = {
    "monitoring": ("Monitoring", MonitoringPage),
    "drift": ("Drift", DriftPage),
    "prediction": ("Prediction testing", PredictionPage),
    "models": ("Model management", ModelsPage),
    "analytics": ("Analytics", AnalyticsPage),
}
DEFAULT_PAGE = "monitoring"

NAV_CSS = """
nav { display: flex; flex-wrap: wrap; gap: 6px; }
nav a { padding: 6px 12px; border-radius: 6px; text-decoration: none; color: #1f3b57;
        background: #eef2f6; font-weight: 500; }
nav a.active { background: #1f3b57; color: #fff; }
"""


def _navigation(current: str) -> pn.pane.HTML:
    links = "".join(
        f'<a href="?page={key}" class="{"active" if key == current else ""}" '
        f'data-page="{key}">{title}</a>'
        for key, (title, _page) in PAGES.items()
    )
    return pn.pane.HTML(f"<nav>{links}</nav>", stylesheets=[NAV_CSS], sizing_mode="stretch_width")


def _requested_page() -> str:
    args = pn.state.session_args or {}
    values = args.get("page") or [DEFAULT_PAGE.encode()]
    return values[0].decode(errors="replace")


def build(page: str) -> pn.template.BootstrapTemplate:
    """The template for one page (an explanation instead of a traceback if it cannot be built)."""
    title, page_class = PAGES.get(page, (None, None))
    content: pn.viewable.Viewable
    if page_class is None:
        content = pn.pane.Alert(
            f"There is no page {page!r}; choose one of: {', '.join(PAGES)}.", alert_type="warning"
        )
    else:
        try:
            context = Context.from_settings(load_settings())
            content = page_class(context)
        except ConfigError as exc:
            content = pn.pane.Alert(
                f"The configuration cannot be used:\n\n```\n{exc}\n```", alert_type="danger"
            )
        except Exception as exc:  # a page that fails must say so, not show a traceback
            log.exception("dashboard page %s failed to build", page)
            content = pn.pane.Alert(
                f"The {title} page could not be built: {type(exc).__name__}: {exc}. "
                "The dashboard log has the details.",
                alert_type="danger",
            )
    template = pn.template.BootstrapTemplate(
        title="Churn platform",
        header_background="#1f3b57",
        meta_viewport="width=device-width, initial-scale=1",
        main=[_navigation(page), content],
    )
    return template


pn.extension(sizing_mode="stretch_width", notifications=False)

if pn.state.served:
    build(_requested_page()).servable(title="Churn platform")
