"""SIGKILL the real lander at several points of a drain and check exactly-once landing."""

import os
import signal
import subprocess
import time

import pytest

from churn_assets.landing import FAULT_ENV_VAR
from churn_assets.schemas import Topics
from churn_assets.warehouse import connect
from tests.integration.landing_helpers import (
    check_exactly_once,
    landed_event_ids,
    produce_customer_events,
    produce_payloads,
    simulated_customer_events,
)

pytestmark = pytest.mark.integration

MESSAGES = 6_000  # 500-message batches -> about 12 batches per drain (3 partitions)
LAND = ["land", "--topic", Topics.CUSTOMERS]


def run_lander(churn_cli, fault: str | None = None, timeout: float = 120):
    env = dict(os.environ)
    env.pop(FAULT_ENV_VAR, None)
    if fault:
        env[FAULT_ENV_VAR] = fault
    return subprocess.run(
        [*churn_cli, *LAND], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    "fault",
    [
        "in_transaction:1",  # early: first batch inserted but not committed
        "in_transaction:6",  # middle
        "in_transaction:12",  # late: the last batch or close to it
        "after_db_commit:1",  # between the DuckDB commit and the Kafka commit
        "after_db_commit:7",
    ],
)
def test_sigkill_then_restart_lands_every_message_once(broker_settings, churn_cli, fault):
    produced = produce_customer_events(broker_settings, MESSAGES)

    killed = run_lander(churn_cli, fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    partial = landed_event_ids(broker_settings)
    assert len(partial) < MESSAGES  # it really died before the end

    finished = run_lander(churn_cli)
    assert finished.returncode == 0, finished.stderr[-2000:]
    result = check_exactly_once(produced, landed_event_ids(broker_settings))
    assert result.exactly_once, result


def test_repeated_kills_including_external_sigkill(broker_settings, churn_cli):
    """Several crashes in a row, one of them an external kill -9 at an arbitrary moment."""
    produced = produce_customer_events(broker_settings, MESSAGES)
    for fault in ("in_transaction:2", "after_db_commit:3"):
        assert run_lander(churn_cli, fault).returncode == -signal.SIGKILL

    process = subprocess.Popen(
        [*churn_cli, *LAND],
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if k != FAULT_ENV_VAR},
    )
    # Kill it once it reports its second landed batch of this run.
    seen = 0
    deadline = time.monotonic() + 60
    while seen < 2 and time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        seen += "rows landed" in line
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL

    assert run_lander(churn_cli).returncode == 0
    assert run_lander(churn_cli).returncode == 0  # a second drain finds nothing new
    result = check_exactly_once(produced, landed_event_ids(broker_settings))
    assert result.exactly_once, result


def test_checker_catches_a_double_delivery(broker_settings, churn_cli):
    """Negative control: the checker reports a message landed twice, and a lost one.

    A message delivered twice on the broker no longer lands twice (its id makes it a replay),
    so the second copy is counted and the duplicate is handed to the checker directly.
    """
    payloads = simulated_customer_events(300)
    produced = produce_payloads(broker_settings, payloads)
    # Deliver one event a second time, at a new offset, as a non-idempotent producer might.
    duplicate_id = payloads[42]["event_id"]
    produce_payloads(broker_settings, [payloads[42]])

    assert run_lander(churn_cli).returncode == 0
    landed = landed_event_ids(broker_settings)
    assert check_exactly_once(produced, landed).exactly_once
    with connect(broker_settings.warehouse_path, read_only=True) as con:
        replays = con.execute("SELECT topic, replayed FROM landing_replays").fetchall()
    assert replays == [(Topics.CUSTOMERS, 1)]

    result = check_exactly_once(produced, [*landed, duplicate_id])
    assert not result.exactly_once
    assert result.duplicates == {duplicate_id: 2}
    assert not result.missing

    # And a lost message is caught too.
    result = check_exactly_once([*produced, "never-landed"], landed)
    assert result.missing == {"never-landed"}
