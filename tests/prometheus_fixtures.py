"""A real Prometheus server (Debian's ``prometheus`` binary) scraping local targets."""

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from tests.serving_fixtures import stop_process

__all__ = ["LocalPrometheus"]

SCRAPE_INTERVAL_S = 1


class LocalPrometheus:
    """``prometheus`` on ``127.0.0.1:port`` scraping ``targets`` (host:port) every second as
    job ``job``; its TSDB lives under ``root``, so a restart keeps what it had scraped."""

    def __init__(self, root: Path, port: int, targets: list[str], job: str) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError(
                "the prometheus server binary is not on PATH: run scripts/bootstrap.sh"
            )
        self.binary = binary
        self.root = root
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = root / "prometheus.log"
        self.config = root / "prometheus.yml"
        root.mkdir(parents=True, exist_ok=True)
        interval = f"{SCRAPE_INTERVAL_S}s"
        self.config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": interval, "scrape_timeout": interval},
                    "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}],
                }
            )
        )
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60) -> None:
        with self.log.open("a") as sink:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={self.root / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"prometheus not ready in {timeout_s}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        self.process = None

    def wait_counted(self, totals: dict[str, float], timeout_s: float = 60) -> None:
        """Wait until Prometheus's latest ``predictions_total`` of each instance (host:port)
        is the total that instance's own ``/metrics`` gave (``totals``): its counters as of
        then are in Prometheus, whatever the machine's load did to the scrape schedule."""
        query = urllib.parse.quote("sum by (instance) (predictions_total)")
        deadline = time.monotonic() + timeout_s
        while True:
            with urllib.request.urlopen(f"{self.url}/api/v1/query?query={query}", timeout=5) as r:
                result = json.load(r)["data"]["result"]
            seen = {s["metric"]["instance"]: float(s["value"][1]) for s in result}
            if all(seen.get(i) == total for i, total in totals.items()):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"Prometheus has {seen}, the pods say {totals}")
            time.sleep(0.2)
