"""A dashboard-style reader reads landed data while a landing run holds the warehouse."""

import subprocess
import time

import duckdb
import pytest

from churn_assets.landing import Lander
from churn_assets.schemas import Topics
from churn_assets.warehouse import load_read_model
from tests.integration.landing_helpers import produce_customer_events

pytestmark = pytest.mark.integration


def test_reader_never_meets_the_writer_lock(broker_settings, churn_cli):
    first = produce_customer_events(broker_settings, 2_000, seed=3)
    Lander(broker_settings, Topics.CUSTOMERS).run()  # publishes the read models it landed
    produce_customer_events(broker_settings, 20_000, seed=4)

    # Small batches make the second drain take a while; it holds the DuckDB file throughout.
    lander = subprocess.Popen(
        [*churn_cli, "land", "--topic", Topics.CUSTOMERS],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert "batch 1" in lander.stderr.readline() + lander.stderr.readline()
        reads = lock_errors = 0
        deadline = time.monotonic() + 60
        while lander.poll() is None and time.monotonic() < deadline:
            frame = load_read_model(broker_settings.read_models_dir, "landed_customer_events")
            assert len(frame) >= len(first)
            assert frame["event_id"].is_unique
            reads += 1
            try:
                duckdb.connect(str(broker_settings.warehouse_path), read_only=True).close()
            except duckdb.IOException as exc:
                assert "lock" in str(exc).lower()
                lock_errors += 1
        assert lander.wait(timeout=60) == 0
    finally:
        if lander.poll() is None:
            lander.kill()
            lander.wait(timeout=30)  # reaped here, not reported by a later test's GC
        lander.stderr.close()
    assert reads >= 5
    # The live file really was locked meanwhile: that is why readers use the read models.
    assert lock_errors >= 1

    final = load_read_model(broker_settings.read_models_dir, "landed_customer_events")
    assert len(final) == 22_000
