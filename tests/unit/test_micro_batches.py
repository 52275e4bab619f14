"""Shadow work is handled off the request path, in micro-batches, and never lost."""

import threading
import time

import pytest

from serving.micro_batches import MicroBatches

pytestmark = pytest.mark.unit


def test_work_queued_while_the_thread_is_busy_is_handled_in_one_call():
    calls: list[list[tuple]] = []
    busy = threading.Event()
    release = threading.Event()

    def handler(items):
        calls.append(items)
        if len(calls) == 1:
            busy.set()
            release.wait(10)

    batches = MicroBatches(handler, name="test-shadow")
    try:
        batches.submit("first")
        assert busy.wait(10)
        for n in range(50):
            batches.submit(n, "later")
        release.set()
        batches.drain(10)
    finally:
        batches.close()
    assert calls[0] == [("first",)]
    assert calls[1:] == [[(n, "later") for n in range(50)]]


def test_at_most_max_items_per_call_and_close_handles_what_is_queued():
    calls: list[int] = []
    gate = threading.Event()

    def handler(items):
        gate.wait(10)
        calls.append(len(items))

    batches = MicroBatches(handler, name="test-shadow", max_items=8)
    for n in range(30):
        batches.submit(n)
    gate.set()
    batches.close()
    assert sum(calls) == 30
    assert max(calls) <= 8
    with pytest.raises(RuntimeError, match="closed"):
        batches.submit(99)


def test_a_failing_handler_is_logged_and_the_thread_goes_on(caplog):
    seen: list[int] = []

    def handler(items):
        if items[0][0] == "boom":
            raise ValueError("shadow model exploded")
        seen.extend(item[0] for item in items)

    batches = MicroBatches(handler, name="test-shadow")
    try:
        batches.submit("boom")
        batches.drain(10)
        batches.submit(1)
        batches.drain(10)
    finally:
        batches.close()
    assert seen == [1]
    assert "shadow model exploded" in caplog.text


def test_drain_says_when_the_work_is_not_done_in_time():
    release = threading.Event()
    batches = MicroBatches(lambda items: release.wait(10), name="test-shadow")
    try:
        batches.submit(1)
        with pytest.raises(TimeoutError, match="0 of 1"):
            batches.drain(0.2)
    finally:
        release.set()
        batches.close()


def test_lingering_gathers_work_submitted_just_after_the_first_item_into_one_call():
    calls: list[list[tuple]] = []
    batches = MicroBatches(calls.append, name="test-shadow", linger_s=0.5)
    try:
        batches.submit("first")
        for n in range(20):  # well within the linger: the thread is still waiting for company
            batches.submit(n)
        batches.drain(10)
        batches.submit("alone")
        batches.drain(10)
    finally:
        batches.close()
    assert calls == [[("first",), *((n,) for n in range(20))], [("alone",)]]


def test_close_cuts_the_linger_short_and_handles_what_is_queued():
    calls: list[int] = []
    batches = MicroBatches(lambda items: calls.append(len(items)), name="test-shadow", linger_s=60)
    batches.submit(1)
    time.sleep(0.3)  # the thread is lingering now, for a minute unless close wakes it
    batches.close(timeout_s=10)
    assert calls == [1]
