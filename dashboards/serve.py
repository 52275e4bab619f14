"""How the dashboard is served: the ``panel serve`` command line that ``churn dashboard`` runs."""

import sys
from pathlib import Path

__all__ = ["APP_PATH", "panel_command"]

APP_PATH = Path(__file__).resolve().parent / "app.py"


def panel_command(port: int, address: str = "127.0.0.1") -> list[str]:
    """``panel serve dashboards/app.py`` on ``address:port``, with a ``/liveness`` endpoint and
    websocket origins for the addresses a browser on this machine uses."""
    hosts = (
        {address, "localhost", "127.0.0.1"} if address in ("127.0.0.1", "localhost") else {address}
    )
    origins = [
        arg for host in sorted(hosts) for arg in ("--allow-websocket-origin", f"{host}:{port}")
    ]
    if address == "0.0.0.0":
        origins = ["--allow-websocket-origin", "*"]
    return [
        str(Path(sys.executable).with_name("panel")),
        "serve",
        str(APP_PATH),
        "--address",
        address,
        "--port",
        str(port),
        "--liveness",
        *origins,
    ]
