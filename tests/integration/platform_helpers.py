"""Running the real `churn up` in a subprocess: ports, readiness, stopping, leftovers."""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

READY_LINE = "ready in "
STOP_DEADLINE_S = 15.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def processes_with_env(marker: str) -> list[int]:
    """Pids of live processes whose environment contains ``marker`` (``NAME=value\\0``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
    return found


def graphql(port: int, query: str) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["data"]


def get_json(url: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


@dataclass
class PlatformRun:
    """One `churn up` process writing to its own log file."""

    process: subprocess.Popen
    log_path: Path
    marker: str
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def start(cls, argv: list[str], env: dict[str, str], log_path: Path) -> "PlatformRun":
        marker = f"CHURN_TEST_RUN={env['CHURN_TEST_RUN']}\0"
        with log_path.open("w") as log:
            process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        return cls(process, log_path, marker)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 480) -> float:
        """Seconds from start to the "ready" line; fails with the log's tail otherwise."""
        deadline = time.monotonic() + timeout_s
        while READY_LINE not in self.output():
            code = self.process.poll()
            assert code is None, f"`churn up` exited with {code}:\n{self.output()[-5000:]}"
            assert time.monotonic() < deadline, (
                f"not ready in {timeout_s}s:\n{self.output()[-5000:]}"
            )
            time.sleep(1)
        return time.monotonic() - self.started

    def stop(self, sig: int = signal.SIGTERM, logs_dir: Path | None = None) -> float:
        """Signal `churn up`, wait for it to exit 0 within the deadline, check nothing is left;
        with ``logs_dir`` (the services' log folder, ``data/logs``), check that what serving,
        Dagster and the dashboard logged after the signal holds no traceback or failed run."""
        sizes = {p: p.stat().st_size for p in logs_dir.glob("*.log")} if logs_dir else {}
        sent = time.monotonic()
        self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout=STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"`churn up` did not stop within {STOP_DEADLINE_S}s of {signal.Signals(sig).name}:"
                f"\n{self.output()[-4000:]}"
            ) from None
        took = time.monotonic() - sent
        assert code == 0, (
            f"exit code {code} after {signal.Signals(sig).name}:\n{self.output()[-4000:]}"
        )
        tail = self.output().split(f"{signal.Signals(sig).name} received", 1)[-1]
        assert "Traceback" not in tail and " ERROR " not in tail and "ERROR:" not in tail, tail
        assert "did not stop within" not in tail, tail
        assert processes_with_env(self.marker) == [], "processes left behind after the stop"
        for path, size in sizes.items():
            with path.open("rb") as log:
                log.seek(size)
                after = log.read().decode(errors="replace")
            for problem in ("Traceback", "RUN_FAILURE", "Sensor tick caught an error"):
                assert problem not in after, f"{path.name} after the stop:\n{after[-4000:]}"
        return took

    def kill(self) -> None:
        """Clean-up for a failed test: SIGKILL whatever of this run is still alive."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for pid in processes_with_env(self.marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
