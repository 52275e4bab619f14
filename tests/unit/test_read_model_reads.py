"""A reader of a read model sees one whole version while publishers replace the file."""

import threading
import time

import duckdb
import pandas as pd
import pytest

from churn_assets.warehouse import (
    ReadModelMissing,
    ReadModelUnreadable,
    load_read_model,
    publish_read_model,
    read_model_path,
    read_model_rows,
    read_model_table,
)

pytestmark = pytest.mark.unit

_TYPES = """
    SELECT range AS id, range::INTEGER AS small, range / 3.0 AS ratio, range % 2 = 0 AS flag,
           'row ' || range::VARCHAR AS label,
           CASE WHEN range % 3 = 0 THEN NULL ELSE range END AS maybe,
           TIMESTAMPTZ '2026-01-01 00:00:00+00' + to_seconds(range) AS at_tz,
           TIMESTAMP '2026-01-01 00:00:00' + to_seconds(range) AS at,
           DATE '2026-01-01' + range::INTEGER AS day
    FROM range(50)
"""


def test_the_frame_is_what_duckdbs_read_parquet_gives(tmp_path):
    con = duckdb.connect()
    try:
        path, rows = publish_read_model(con, tmp_path, "typed", _TYPES)
        reference = con.execute("SELECT * FROM read_parquet(?)", [str(path)]).df()
    finally:
        con.close()
    frame = load_read_model(tmp_path, "typed")
    assert rows == len(frame) == 50
    pd.testing.assert_frame_equal(frame, reference)
    assert frame["maybe"].isna().sum() == 17


def test_reads_while_a_publisher_replaces_the_file_never_fail(tmp_path):
    """Reading by path twice (footer, then data) met a newer file in 1 read in 10 here."""
    con = duckdb.connect()
    publish_read_model(con, tmp_path, "live", "SELECT 0 AS version, range AS id FROM range(10)")
    con.close()
    stop = threading.Event()
    published = [0]

    def publish() -> None:
        writer = duckdb.connect()
        try:
            while not stop.is_set():
                published[0] += 1
                version = published[0]
                # Row counts vary, so a mixed footer and body cannot line up by luck.
                rows = 20_000 + version % 7
                query = f"SELECT {version} AS version, range AS id FROM range({rows})"
                publish_read_model(writer, tmp_path, "live", query)
        finally:
            writer.close()

    thread = threading.Thread(target=publish)
    thread.start()
    reads = 0
    try:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            frame = load_read_model(tmp_path, "live")
            assert frame["version"].nunique() == 1
            version = int(frame["version"].iloc[0])
            assert len(frame) == (10 if version == 0 else 20_000 + version % 7)
            assert frame["id"].is_unique
            reads += 1
    finally:
        stop.set()
        thread.join(timeout=30)
    assert reads >= 50
    assert published[0] >= 50
    assert read_model_path(tmp_path, "live").exists()


def test_rows_and_columns_of_one_version_and_a_missing_model_named(tmp_path):
    con = duckdb.connect()
    try:
        publish_read_model(con, tmp_path, "numbers", "SELECT range AS n, 'x' AS s FROM range(7)")
    finally:
        con.close()
    assert read_model_rows(tmp_path, "numbers") == 7
    table = read_model_table(tmp_path, "numbers", ["n"])
    assert table.column_names == ["n"] and table.num_rows == 7
    for read in (read_model_rows, read_model_table, load_read_model):
        with pytest.raises(ReadModelMissing, match="'absent' has not been published yet"):
            read(tmp_path, "absent")


def test_a_file_that_is_not_parquet_is_named_unreadable(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"not a parquet file")
    for read in (read_model_rows, read_model_table, load_read_model):
        with pytest.raises(ReadModelUnreadable, match="read model 'broken'"):
            read(tmp_path, "broken")
