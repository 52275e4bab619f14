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
