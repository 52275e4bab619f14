"""Kafka client errors reach the log rate-limited, librdkafka's lines at the right level."""

import logging

import pytest

from serving.mirror import LibrdkafkaLog, RateLimitedErrors

pytestmark = pytest.mark.unit


def test_errors_are_one_warning_per_interval_with_a_count_of_what_was_left_out(caplog, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("serving.mirror.time.monotonic", lambda: clock[0])
    errors = RateLimitedErrors("feedback producer", interval_s=30.0)
    with caplog.at_level(logging.WARNING, logger="serving.mirror"):
        for second in range(65):  # a broker down for a minute reports every second
            clock[0] = 100.0 + second
            errors(f"Connect to 127.0.0.1:9092 failed ({second})")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "feedback producer: Kafka client error: Connect to 127.0.0.1:9092 failed (0)",
        "feedback producer: Kafka client error: Connect to 127.0.0.1:9092 failed (30) "
        "(29 more since the last report)",
        "feedback producer: Kafka client error: Connect to 127.0.0.1:9092 failed (60) "
        "(29 more since the last report)",
    ]


def test_librdkafka_lines_go_to_debug_except_configuration_warnings(caplog):
    logger = logging.getLogger("test.librdkafka")
    sink = LibrdkafkaLog(logger)
    with caplog.at_level(logging.DEBUG, logger="test.librdkafka"):
        # confluent-kafka maps syslog levels to logging levels before calling the logger.
        sink.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#producer-1", "Connection refused")
        sink.log(logging.WARNING, "%s [%s] %s", "CONFWARN", "rdkafka#producer-1", "unknown prop")
    assert [(r.levelno, r.getMessage().split()[0]) for r in caplog.records] == [
        (logging.DEBUG, "FAIL"),
        (logging.WARNING, "CONFWARN"),
    ]
