"""Temporary read-model files of dead processes are swept; a live publisher's never are."""

import os
import subprocess
import sys

import duckdb
import pytest

from churn_assets.warehouse import publish_read_model, remove_stale_temp_files

pytestmark = pytest.mark.unit


@pytest.fixture
def pids():
    """(a pid whose process has exited, a pid whose process is alive)."""
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait(timeout=30)
    with pytest.raises(ProcessLookupError):
        os.kill(finished.pid, 0)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield finished.pid, alive.pid
    finally:
        alive.kill()
        alive.wait(timeout=30)


def test_only_dead_processes_temp_files_are_removed(tmp_path, pids):
    dead, alive = pids
    stale = [
        f".landed_customer_events.parquet.{dead}.tmp",
        f".rollout_state.json.{dead}.tmp",
        f".monitoring.json.{dead}.tmp",
    ]
    kept = [
        f".dead_letters.parquet.{alive}.tmp",  # a live publisher, mid-write
        f".landing_offsets.parquet.{os.getpid()}.tmp",  # this process
        "landed_customer_events.parquet",
        "notes.tmp",
        f"landed.parquet.{dead}.tmp",  # not hidden: not a publisher's temp file
        f".v3.{dead}.tmp.bak",
    ]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"")

    removed = remove_stale_temp_files(tmp_path)
    assert sorted(p.name for p in removed) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    assert remove_stale_temp_files(tmp_path) == []
    assert remove_stale_temp_files(tmp_path / "missing") == []


def test_publishing_a_read_model_sweeps_the_folder_first(tmp_path, pids):
    dead, alive = pids
    (tmp_path / f".landing_replays.parquet.{dead}.tmp").write_bytes(b"")
    (tmp_path / f".landing_replays.parquet.{alive}.tmp").write_bytes(b"")
    con = duckdb.connect()
    try:
        path, rows = publish_read_model(con, tmp_path, "numbers", "SELECT range AS n FROM range(3)")
    finally:
        con.close()
    assert (path.name, rows) == ("numbers.parquet", 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f".landing_replays.parquet.{alive}.tmp",
        "numbers.parquet",
    ]
