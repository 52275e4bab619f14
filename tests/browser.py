"""Headless Chromium for the browser tests: Debian's chromium, driven by Playwright (never a
downloaded browser: nothing may be fetched at run time)."""

import contextlib
from collections.abc import Iterator
from typing import Any

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
