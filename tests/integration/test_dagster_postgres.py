"""The production Dagster instance (config/dagster-postgres.yaml, dagster-postgres) on a real local
PostgreSQL server: an asset materialises, and the run and its materialisation are in Postgres.

The server is Debian's PostgreSQL (``/usr/lib/postgresql/<version>/bin``), started for this module
on a free loopback port with a data directory in a temp folder owned by the ``postgres`` user
(``initdb`` refuses root), and always stopped at the end."""

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import psycopg2
import pytest

from churn_assets.config import REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PASSWORD = "test-only-password"


def _pg_bin() -> Path:
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name)
    )
    assert candidates, "PostgreSQL server binaries missing: run ./scripts/bootstrap.sh"
    return candidates[-1].parent


def _as_postgres(*command: str) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *command]
    return list(command)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def postgres() -> Iterator[dict[str, str]]:
    bin_dir = _pg_bin()
    root = Path(tempfile.mkdtemp(prefix="churn-pg-"))
    data, socket_dir = root / "data", root / "socket"
    socket_dir.mkdir()
    pwfile = root / "pwfile"
    pwfile.write_text(PASSWORD + "\n")
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        for path in (socket_dir, pwfile):
            shutil.chown(path, "postgres", "postgres")
    port = _free_port()
    log = root / "postgres.log"
    subprocess.run(
        _as_postgres(
            str(bin_dir / "initdb"),
            "-D",
            str(data),
            "-U",
            "dagster",
            f"--pwfile={pwfile}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--no-sync",
        ),
        check=True,
        capture_output=True,
        timeout=120,
    )
    options = f"-p {port} -k {socket_dir} -c listen_addresses=127.0.0.1 -c fsync=off"
    started = subprocess.run(
        _as_postgres(
            str(bin_dir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(log),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        ),
        capture_output=True,
        text=True,
        timeout=90,
    )
    try:
        assert started.returncode == 0, (
            started.stdout + started.stderr + (log.read_text() if log.exists() else "")
        )
        connection = psycopg2.connect(
            host="127.0.0.1", port=port, user="dagster", password=PASSWORD, dbname="postgres"
        )
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("CREATE DATABASE dagster")
        connection.close()
        yield {
            "DAGSTER_PG_HOST": "127.0.0.1",
            "DAGSTER_PG_PORT": str(port),
            "DAGSTER_PG_DB": "dagster",
            "DAGSTER_PG_USERNAME": "dagster",
            "DAGSTER_PG_PASSWORD": PASSWORD,
        }
    finally:
        subprocess.run(
            _as_postgres(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"),
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(root, ignore_errors=True)


@dg.asset(group_name="deployment_check", kinds={"python"})
def churn_deployment_probe() -> dg.MaterializeResult:
    """A tiny asset whose materialisation must land in the PostgreSQL event log."""
    return dg.MaterializeResult(metadata={"rows": 3})


def test_instance_on_postgres_materialises_an_asset(postgres, tmp_path, monkeypatch):
    for key, value in postgres.items():
        monkeypatch.setenv(key, value)
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(REPO_ROOT / "config/dagster-postgres.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))

    with dg.DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"
        result = dg.materialize([churn_deployment_probe], instance=instance)
        assert result.success
        run_id = result.run_id
        record = instance.get_latest_materialization_event(dg.AssetKey("churn_deployment_probe"))
        assert record is not None and record.run_id == run_id

    connection = psycopg2.connect(
        host=postgres["DAGSTER_PG_HOST"],
        port=int(postgres["DAGSTER_PG_PORT"]),
        user=postgres["DAGSTER_PG_USERNAME"],
        password=postgres["DAGSTER_PG_PASSWORD"],
        dbname=postgres["DAGSTER_PG_DB"],
    )
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT status FROM runs WHERE run_id = %s", (run_id,))
            assert cursor.fetchall() == [("SUCCESS",)]
            cursor.execute(
                "SELECT asset_key FROM event_logs WHERE run_id = %s "
                "AND dagster_event_type = 'ASSET_MATERIALIZATION'",
                (run_id,),
            )
            rows = cursor.fetchall()
            assert len(rows) == 1 and "churn_deployment_probe" in rows[0][0]
    finally:
        connection.close()
