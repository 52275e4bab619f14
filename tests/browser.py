"""Headless Chromium for the browser tests: Debian's chromium, driven by Playwright (never a
downloaded browser: nothing may be fetched at run time)."""

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from churn_assets.config import REPO_ROOT
from tests.serving_fixtures import ADMIN_TOKEN, free_port

CHROMIUM = "/usr/bin/chromium"


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium, closed on exit (use it for a module-scoped ``browser`` fixture)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield browser
        finally:
            browser.close()


class Dashboard:
    """``churn dashboard`` (``panel serve``) on a free port against ``config_path`` and the
    serving process at ``serving_url``, in a process group of its own; ready on return."""

    def __init__(self, config_path: Path, serving_url: str, log_path: Path) -> None:
        self.port = free_port()
        self.config_path = config_path
        self.url = f"http://127.0.0.1:{self.port}/app"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHURN_")}
        env |= {
            "CHURN_CONFIG": str(config_path),
            "CHURN_SERVING__HTTP_PORT": serving_url.rsplit(":", 1)[1],
            "CHURN_DAGSTER__WEBSERVER_PORT": str(free_port()),  # nothing listens: explained
            "CHURN_ADMIN_TOKEN": ADMIN_TOKEN,
        }
        self.log_path = log_path
        with log_path.open("a") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "churn_assets.cli",
                    "--config",
                    str(config_path),
                    "dashboard",
                    "--port",
                    str(self.port),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO_ROOT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"panel serve exited:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/liveness", timeout=2):
                    return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"panel serve not up in 60 s:\n{log_path.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


# -- devices and layout checks ---------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    """A browser window: desktop, or a phone/tablet emulated as Playwright does it (a mobile
    viewport that honours ``<meta name="viewport">``, touch, a device pixel ratio and a mobile
    user agent)."""

    name: str
    width: int
    height: int
    scale: float = 1
    mobile: bool = False
    user_agent: str | None = None

    def context_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "viewport": {"width": self.width, "height": self.height},
            "device_scale_factor": self.scale,
            "is_mobile": self.mobile,
            "has_touch": self.mobile,
        }
        if self.user_agent:
            options["user_agent"] = self.user_agent
        return options


def _android(name: str, width: int, height: int, scale: float, model: str, phone: bool) -> Device:
    """Chrome on an Android ``model``: a phone's user agent says "Mobile", a tablet's does not."""
    agent = (
        f"Mozilla/5.0 (Linux; Android 14; {model}) AppleWebKit/537.36 (KHTML, like Gecko) "
        f"Chrome/126.0.0.0 {'Mobile ' if phone else ''}Safari/537.36"
    )
    return Device(name, width, height, scale=scale, mobile=True, user_agent=agent)


DESKTOP = Device("desktop", 1440, 900)
TABLET = _android("tablet", 820, 1180, 2, "SM-X710", phone=False)
PHONE = _android("phone", 390, 844, 3, "Pixel 8", phone=True)
DEVICES = (DESKTOP, TABLET, PHONE)

# Elements of the page, including those inside Panel's shadow roots, as a JS generator.
_DEEP = """
function* deep(root) {
  for (const el of root.querySelectorAll('*')) {
    yield el;
    if (el.shadowRoot) yield* deep(el.shadowRoot);
  }
}
"""

# The viewport the page was laid out in, the document's width, the boxes that scroll sideways
# (wide tables may, inside their own box; nothing else should) and what is cut off: text or a
# chart canvas reaching past the window's edges outside any box that scrolls sideways.
LAYOUT_JS = (
    "() => {"
    + _DEEP
    + """
  const scrollsSideways = (el) => ['auto', 'scroll'].includes(getComputedStyle(el).overflowX)
    && el.scrollWidth > el.clientWidth + 1;
  const parentOf = (el) => el.parentElement
    || (el.getRootNode() instanceof ShadowRoot ? el.getRootNode().host : null);
  const name = (el) => el.tagName.toLowerCase() + '.' + [...el.classList].join('.');
  const sideways = [], cut = [];
  for (const el of deep(document)) {
    if (scrollsSideways(el)) {
      const root = el.shadowRoot || el;
      sideways.push({
        element: name(el),
        table: root.querySelector('table.panel-df') !== null,
        scrollWidth: el.scrollWidth, clientWidth: el.clientWidth,
      });
    }
    const ownText = [...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
    if (!ownText && el.tagName !== 'CANVAS') continue;
    const box = el.getBoundingClientRect();
    if (box.width === 0 || box.height === 0) continue;
    if (box.left >= -1 && box.right <= window.innerWidth + 1) continue;
    let ancestor = parentOf(el);
    while (ancestor && !scrollsSideways(ancestor)) ancestor = parentOf(ancestor);
    if (!ancestor) {
      cut.push({element: name(el), text: el.textContent.trim().slice(0, 40),
                left: box.left, right: box.right});
    }
  }
  return {
    innerWidth: window.innerWidth,
    scale: window.visualViewport.scale,
    scrollWidth: document.scrollingElement.scrollWidth,
    sideways: sideways,
    cut: cut,
  };
}"""
)

# Size, horizontal position and font size (CSS px) of the elements a locator matched.
BOXES_JS = """(elements) => elements.map((el) => {
  const box = el.getBoundingClientRect();
  return {
    text: (el.innerText || el.value || '').trim().slice(0, 60),
    left: box.left, right: box.right, width: box.width, height: box.height,
    fontSize: parseFloat(getComputedStyle(el).fontSize),
  };
})"""


def layout(page: Any) -> dict[str, Any]:
    """:data:`LAYOUT_JS` on ``page``."""
    return page.evaluate(LAYOUT_JS)


def boxes(locator: Any) -> list[dict[str, Any]]:
    """:data:`BOXES_JS` on every element ``locator`` matches."""
    return locator.evaluate_all(BOXES_JS)


def screenshot_whole_page(
    page: Any, path: Path, max_height: int = 6000, *, css_pixels: bool = False
) -> None:
    """A screenshot of all of ``page`` (its top ``max_height`` CSS pixels): the template scrolls
    inside its main area, so the window is made as tall as that area's content for the shot,
    then set back. ``css_pixels``: one image pixel per CSS pixel, whatever the device's pixel
    ratio."""
    size = page.viewport_size
    height = page.evaluate(
        "() => Math.max(document.scrollingElement.scrollHeight,"
        " ...[...document.querySelectorAll('#main, main')].map(e => e.scrollHeight))"
    )
    page.set_viewport_size(
        {"width": size["width"], "height": min(max(height, size["height"]), max_height)}
    )
    page.wait_for_timeout(800)  # Bokeh lays its canvases out again
    page.screenshot(path=str(path), scale="css" if css_pixels else "device")
    page.set_viewport_size(size)
