"""Regenerate the screenshots in docs/images/dashboard/ used by docs/DASHBOARD_GUIDE.md.

Runs the dashboard's page tests (real serving process, real broker, sample read models published
with the project's code; see tests/integration/test_dashboard_browser.py), which write one image
per page on a 1440 px desktop and a few on a 390 px phone (mobile emulation), then reduces each to
a 128-colour palette so the committed PNGs stay small.
Usage: .venv/bin/python scripts/dashboard_screenshots.py
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
TARGET = REPO / "docs" / "images" / "dashboard"
PAGES = ("monitoring", "drift", "prediction", "models", "analytics")
PHONE_PAGES = ("monitoring", "analytics")  # DOCS_PHONE_PAGES in the test
IMAGES = (*PAGES, *(f"{page}-phone" for page in PHONE_PAGES))


def main() -> int:
    with tempfile.TemporaryDirectory() as raw:
        env = dict(os.environ, CHURN_DASHBOARD_DOCS_DIR=raw)
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                str(REPO / "tests" / "integration" / "test_dashboard_browser.py"),
                "-k",
                "test_page_reads or prediction_form",
            ],
            cwd=REPO,
            env=env,
        )
        if result.returncode != 0:
            print("the browser tests failed; no screenshots were updated", file=sys.stderr)
            return result.returncode
        TARGET.mkdir(parents=True, exist_ok=True)
        total = 0
        for page in IMAGES:
            source = Path(raw) / f"{page}.png"
            image = Image.open(source).convert("RGB")
            image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(
                TARGET / f"{page}.png", optimize=True
            )
            size = (TARGET / f"{page}.png").stat().st_size
            total += size
            print(f"{TARGET / f'{page}.png'}: {image.width}x{image.height}, {size / 1024:.0f} KiB")
        print(f"total {total / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
