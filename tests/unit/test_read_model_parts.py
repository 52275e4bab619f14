"""Landed tables' read models in parts: a publish writes the rows landed since the last one (and
merges the newest parts now and then), readers see one whole version, a kill between a part and
its manifest leaves the last version readable, and the next publish catches up."""

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta

import duckdb
import pytest

from churn_assets.warehouse import (
    READ_MODEL_FAULT_ENV_VAR,
    load_read_model,
    manifest_path,
    parts_dir,
    publish_read_model,
    publish_read_model_parts,
    read_model_path,
    read_model_rows,
    read_model_table,
)

pytestmark = pytest.mark.unit

ORDER = "landed_at, id"
START = datetime(2026, 1, 1, tzinfo=UTC)


def make_table(path):
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE landed (id BIGINT, label VARCHAR, landed_at TIMESTAMPTZ NOT NULL)")
    return con


def land(con, count: int, start_id: int, at: datetime) -> None:
    """``count`` rows landed at ``at``, as one batch of the lander."""
    con.execute(
        "INSERT INTO landed (id, label, landed_at) "
        "SELECT range + ?, 'row ' || (range + ?)::VARCHAR, ? FROM range(?)",
        [start_id, start_id, at, count],
    )


def expected(con) -> list[dict]:
    """The table's rows in the read model's order."""
    return con.sql(f"SELECT * FROM landed ORDER BY {ORDER}").to_arrow_table().to_pylist()


def test_a_publish_writes_the_new_rows_only_and_readers_get_the_whole_table(tmp_path):
    con = make_table(tmp_path / "w.duckdb")
    models = tmp_path / "models"
    land(con, 1_000, 0, START)
    first = publish_read_model_parts(con, models, "landed", ORDER)
    assert (first.rows, first.written, first.parts, first.rebuilt) == (1_000, 1_000, 1, True)
    land(con, 10, 1_000, START + timedelta(seconds=1))
    second = publish_read_model_parts(con, models, "landed", ORDER)
    # 10 new rows: one part of 10 beside the 1,000 (far smaller than half of it: no merge).
    assert (second.rows, second.written, second.parts, second.rebuilt) == (1_010, 10, 2, False)
    assert read_model_table(models, "landed").to_pylist() == expected(con)
    assert read_model_rows(models, "landed") == 1_010
    assert len(load_read_model(models, "landed")) == 1_010
    assert read_model_path(models, "landed") == manifest_path(models, "landed")
    # Nothing new: nothing written, the manifest left as it was.
    before = manifest_path(models, "landed").stat().st_mtime_ns
    again = publish_read_model_parts(con, models, "landed", ORDER)
    assert (again.rows, again.written) == (1_010, 0)
    assert manifest_path(models, "landed").stat().st_mtime_ns == before


def test_a_table_published_empty_gets_its_first_rows_written_once(tmp_path):
    con = make_table(tmp_path / "w.duckdb")
    models = tmp_path / "models"
    empty = publish_read_model_parts(con, models, "landed", ORDER)
    assert (empty.rows, empty.written, empty.parts) == (0, 0, 1)
    assert read_model_table(models, "landed").column_names == ["id", "label", "landed_at"]
    land(con, 40, 0, START)
    first = publish_read_model_parts(con, models, "landed", ORDER)
    assert (first.rows, first.written, first.parts) == (40, 40, 1)
    assert read_model_table(models, "landed").to_pylist() == expected(con)


def test_merges_keep_few_parts_and_rewrite_each_row_a_few_times(tmp_path):
    con = make_table(tmp_path / "w.duckdb")
    models = tmp_path / "models"
    written = 0
    for run in range(64):
        land(con, 100, run * 100, START + timedelta(seconds=run))
        published = publish_read_model_parts(con, models, "landed", ORDER)
        written += published.written
        assert published.parts <= 8  # about log2(runs) + 1
        assert read_model_table(models, "landed").to_pylist() == expected(con)
    # 6,400 rows, each written when new and at most log2(64) = 6 times more by merges.
    assert 6_400 < written <= 6_400 * 7
    on_disk = {p.name for p in parts_dir(models, "landed").iterdir()}
    assert len(on_disk) == published.parts  # merged parts are gone


def test_rows_changed_around_the_publisher_are_published_whole_again(tmp_path):
    con = make_table(tmp_path / "w.duckdb")
    models = tmp_path / "models"
    land(con, 100, 0, START)
    publish_read_model_parts(con, models, "landed", ORDER)
    # A migration's deduplication deletes a published row; a fixture lands one with an old time.
    con.execute("DELETE FROM landed WHERE id = 5")
    land(con, 1, 500, START - timedelta(days=1))
    republished = publish_read_model_parts(con, models, "landed", ORDER)
    assert (republished.rebuilt, republished.rows, republished.written) == (True, 100, 100)
    assert read_model_table(models, "landed").to_pylist() == expected(con)
    # A new column (a contract feature) publishes it whole too, with the column.
    con.execute("ALTER TABLE landed ADD COLUMN extra INTEGER")
    land(con, 3, 1_000, START + timedelta(days=1))
    widened = publish_read_model_parts(con, models, "landed", ORDER)
    assert widened.rebuilt and "extra" in read_model_table(models, "landed").column_names


def test_an_earlier_single_file_read_model_is_replaced_by_the_parts(tmp_path):
    con = make_table(tmp_path / "w.duckdb")
    models = tmp_path / "models"
    land(con, 20, 0, START)
    publish_read_model(con, models, "landed", "SELECT * FROM landed")  # an earlier release's
    assert read_model_path(models, "landed").name == "landed.parquet"
    land(con, 5, 20, START + timedelta(seconds=1))
    publish_read_model_parts(con, models, "landed", ORDER)
    assert not (models / "landed.parquet").exists()
    assert read_model_table(models, "landed").to_pylist() == expected(con)


def test_readers_during_publishes_and_merges_see_one_whole_version(tmp_path):
    """A publisher lands and publishes (merging parts, deleting merged ones) as fast as it can;
    every read is a whole prefix of the landed rows: ids 0..n-1 in order, n a multiple of 50."""
    con = make_table(tmp_path / "w.duckdb")
    models = tmp_path / "models"
    land(con, 50, 0, START)
    publish_read_model_parts(con, models, "landed", ORDER)
    con.close()
    stop = threading.Event()
    runs = [0]
    failures: list[BaseException] = []

    def publish() -> None:
        writer = duckdb.connect(str(tmp_path / "w.duckdb"))
        try:
            while not stop.is_set():
                runs[0] += 1
                land(writer, 50, runs[0] * 50, START + timedelta(seconds=runs[0]))
                publish_read_model_parts(writer, models, "landed", ORDER)
        except BaseException as exc:  # reported by the test below
            failures.append(exc)
        finally:
            writer.close()

    thread = threading.Thread(target=publish)
    thread.start()
    reads = 0
    try:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            ids = read_model_table(models, "landed", ["id"])["id"].to_pylist()
            assert ids == list(range(len(ids))) and len(ids) % 50 == 0
            assert read_model_rows(models, "landed") % 50 == 0
            reads += 1
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not failures
    assert reads >= 50 and runs[0] >= 20


PUBLISH = """
import sys
from pathlib import Path
import duckdb
from churn_assets.warehouse import publish_read_model_parts
con = duckdb.connect(sys.argv[1])
publish_read_model_parts(con, Path(sys.argv[2]), "landed", "landed_at, id")
"""


@pytest.mark.parametrize("point", ["before_manifest", "before_part_cleanup"])
def test_a_publisher_killed_mid_publish_leaves_a_whole_version_and_the_next_catches_up(
    tmp_path, point
):
    database, models = tmp_path / "w.duckdb", tmp_path / "models"
    con = make_table(database)
    land(con, 300, 0, START)
    publish_read_model_parts(con, models, "landed", ORDER)
    land(con, 100, 300, START + timedelta(seconds=1))  # a part of its own (no merge)
    con.close()
    killed = subprocess.run(
        [sys.executable, "-c", PUBLISH, str(database), str(models)],
        env={**os.environ, READ_MODEL_FAULT_ENV_VAR: point},
        capture_output=True,
        timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    # The new part was written; the manifest is the old one (or the new one, once swapped).
    parts = {p.name for p in parts_dir(models, "landed").iterdir()}
    assert len(parts) == 2
    ids = read_model_table(models, "landed", ["id"])["id"].to_pylist()
    assert ids == list(range(300 if point == "before_manifest" else 400))
    con = duckdb.connect(str(database))
    caught_up = publish_read_model_parts(con, models, "landed", ORDER)
    assert caught_up.rows == 400
    assert read_model_table(models, "landed").to_pylist() == expected(con)
    # The orphan part of the killed publisher is gone; only the manifest's parts remain.
    assert len(list(parts_dir(models, "landed").iterdir())) == caught_up.parts
