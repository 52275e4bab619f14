"""SIGKILL ``churn land`` at random points while half-malformed data flows.

Rounds of customer messages (half of them malformed or invalid) are produced; after each round a
real ``churn land`` subprocess is killed: at a fault-injection point (``after_db_commit``, where
dead letters used to be lost from the topic, or ``in_transaction``), a few seeded milliseconds
after its k-th batch, or at a seeded random moment after its start. After one clean run:
every bad message is in ``dead_letters`` exactly once and on ``churn.dead-letter`` at least once
(deduplicated by key, read to EOF), every valid message landed exactly once, nothing counted as
a replay, and no temporary file of a dead process is left in the read-models folder.
"""

import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from churn_assets.config import Settings
from churn_assets.kafka import make_producer, topic_log
from churn_assets.landing import FAULT_ENV_VAR, dead_letter_key
from churn_assets.schemas import Topics, encode_message
from churn_assets.warehouse import connect, load_read_model
from tests.conftest import write_config
from tests.integration.landing_helpers import (
    check_at_least_once,
    check_exactly_once,
    corruptions,
    landed_event_ids,
    read_topic_keys,
    simulated_customer_events,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
log = logging.getLogger(__name__)

SEED = 20260611
VALID = 2_000
MALFORMED = 2_000
ROUNDS = 16  # 250 messages each, 25-message batches: at least 10 batches per run
FAULT_ROUNDS = 5
LAND = ["land", "--topic", Topics.CUSTOMERS]
# (raw value, key, event id of a valid message or None for a malformed one)
Message = tuple[bytes | None, bytes, str | None]


@pytest.fixture
def settings_path(tmp_path: Path) -> Path:
    return write_config(tmp_path, landing={"batch_max_messages": 25, "batch_max_seconds": 1.0})


def planned_messages(rng: random.Random) -> list[Message]:
    valid = simulated_customer_events(VALID, seed=61)
    templates = simulated_customer_events(MALFORMED, seed=62)
    messages: list[Message] = [
        (encode_message(Topics.CUSTOMERS, p), p["customer_id"].encode(), p["event_id"])
        for p in valid
    ]
    messages += [
        (corruptions(p)[rng.randrange(12)][0], f"bad-{i}".encode(), None)
        for i, p in enumerate(templates)
    ]
    rng.shuffle(messages)
    return messages


def produce(settings: Settings, messages: list[Message]) -> list[tuple[int, int]]:
    """Produce ``messages``; returns the (partition, offset) of each malformed one."""
    malformed: list[tuple[int, int]] = []
    errors: list[str] = []

    def delivered(error, message, *, bad: bool) -> None:
        if error is not None:
            errors.append(str(error))
        elif bad:
            malformed.append((message.partition(), message.offset()))

    producer = make_producer(settings)
    for raw, key, event_id in messages:
        producer.produce(
            Topics.CUSTOMERS,
            key=key,
            value=raw,
            on_delivery=lambda e, m, bad=event_id is None: delivered(e, m, bad=bad),
        )
    assert producer.flush(30) == 0
    assert not errors, errors
    return malformed


def lander_env(fault: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV_VAR}
    if fault:
        env[FAULT_ENV_VAR] = fault
    return env


def kill_after_batches(
    churn_cli, stderr_path: Path, batches: int, delay_s: float
) -> tuple[int, int]:
    """Start a lander, SIGKILL it ``delay_s`` after it reports its ``batches``-th batch."""
    with stderr_path.open("w") as err:
        process = subprocess.Popen([*churn_cli, *LAND], stderr=err, env=lander_env())
    deadline = time.monotonic() + 90
    while process.poll() is None and time.monotonic() < deadline:
        if stderr_path.read_text().count("rows landed") >= batches:
            time.sleep(delay_s)
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    return process.pid, process.wait(timeout=30)


def kill_after(churn_cli, delay_s: float) -> tuple[int, int]:
    """Start a lander, SIGKILL it ``delay_s`` after its start, wherever it is."""
    process = subprocess.Popen([*churn_cli, *LAND], stderr=subprocess.DEVNULL, env=lander_env())
    try:
        process.wait(timeout=delay_s)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
    return process.pid, process.wait(timeout=30)


def test_dead_letters_survive_random_sigkills(broker_settings, churn_cli, tmp_path):
    settings = broker_settings
    rng = random.Random(SEED)
    messages = planned_messages(rng)
    valid_ids = [event_id for _, _, event_id in messages if event_id is not None]
    assert (len(valid_ids), len(messages)) == (VALID, VALID + MALFORMED)
    epoch = topic_log(settings, Topics.CUSTOMERS).epoch
    chunk = len(messages) // ROUNDS
    fault_rounds = set(rng.sample(range(ROUNDS), FAULT_ROUNDS))

    malformed: list[tuple[int, int]] = []
    outcomes: list[tuple[str, int]] = []
    killed_pids: list[int] = []
    temp_files_seen = 0
    for number in range(ROUNDS):
        malformed += produce(settings, messages[number * chunk : (number + 1) * chunk])
        if number in fault_rounds:
            point = rng.choice(["after_db_commit", "after_db_commit", "in_transaction"])
            fault = f"{point}:{rng.randint(1, 6)}"
            run = subprocess.run(
                [*churn_cli, *LAND],
                capture_output=True,
                text=True,
                timeout=120,
                env=lander_env(fault),
            )
            assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
            outcomes.append((fault, run.returncode))
            continue
        if rng.random() < 0.7:
            batches, delay = rng.randint(1, 6), rng.uniform(0.0, 0.05)
            stderr_log = tmp_path / f"lander-{number}.log"
            pid, returncode = kill_after_batches(churn_cli, stderr_log, batches, delay)
            outcomes.append((f"after batch {batches} + {delay:.3f}s", returncode))
        else:
            delay = rng.uniform(0.3, 3.0)
            pid, returncode = kill_after(churn_cli, delay)
            outcomes.append((f"{delay:.2f}s after start", returncode))
        if returncode == -signal.SIGKILL:
            killed_pids.append(pid)
        temp_files_seen += len(list(settings.read_models_dir.glob(".*.tmp")))
    kills = sum(returncode == -signal.SIGKILL for _, returncode in outcomes)
    assert kills >= 10, outcomes
    assert len(malformed) == MALFORMED

    # Files a killed publisher leaves (its pid is gone), beside a live publisher's file.
    for pid in killed_pids[:2]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    stale = [
        settings.read_models_dir / f".landed_customer_events.parquet.{killed_pids[0]}.tmp",
        settings.read_models_dir / f".rollout_state.json.{killed_pids[1]}.tmp",
    ]
    live_publisher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    live = settings.read_models_dir / f".dead_letters.parquet.{live_publisher.pid}.tmp"
    try:
        for path in [*stale, live]:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")

        final = subprocess.run(
            [*churn_cli, *LAND], capture_output=True, text=True, timeout=180, env=lander_env()
        )
        assert final.returncode == 0, final.stderr[-3000:]
        assert sorted(settings.read_models_dir.glob(".*.tmp")) == [live]
    finally:
        live_publisher.kill()
        live_publisher.wait(timeout=30)

    # Every valid message landed exactly once; crashes never look like replays.
    result = check_exactly_once(valid_ids, landed_event_ids(settings))
    assert result.exactly_once, result
    expected = {dead_letter_key(epoch, Topics.CUSTOMERS, p, o) for p, o in malformed}
    with connect(settings.warehouse_path, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM landing_replays").fetchall() == [(0,)]
        table = con.execute(
            "SELECT kafka_epoch, kafka_topic, kafka_partition, kafka_offset, published_at "
            "FROM dead_letters"
        ).fetchall()
    # The table holds every bad message exactly once, each confirmed on the topic.
    assert sorted(dead_letter_key(*row[:4]) for row in table) == sorted(expected)
    assert all(row[4] is not None for row in table)
    dead = load_read_model(settings.read_models_dir, "dead_letters")
    assert len(dead) == MALFORMED and dead["published_at"].notna().all()

    # The topic holds every one at least once (a consumer dedupes by key), nothing else.
    consumed = read_topic_keys(settings, Topics.DEAD_LETTER)
    check = check_at_least_once(expected, consumed)
    assert check.complete, (check.missing, check.unexpected)
    log.info(
        "%d kills (%s); %d temp files seen after kills; %d dead-letter messages for %d dead "
        "letters",
        kills,
        outcomes,
        temp_files_seen,
        len(consumed),
        len(expected),
    )

    # Negative control: the same check, on the topic minus one dead letter, names it missing.
    dropped = rng.choice(sorted(expected))
    check = check_at_least_once(expected, [key for key in consumed if key != dropped])
    assert not check.complete
    assert (check.missing, check.unexpected) == ({dropped}, set())
