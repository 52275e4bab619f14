"""``POST /feedback``'s path to Kafka: a 2xx only for an outcome the broker acknowledged.

The producer's delivery reports are served by a poll thread of its own; a request hands its
message to the producer (never blocking: a full local queue is refused at once) and awaits its
own delivery report on the event loop, for at most :data:`DELIVERY_TIMEOUT_S`. Nothing is
spooled locally: an outcome that was not acknowledged is answered 503 and the caller retries
(the landing deduplicates by ``event_id``, and each call mints a new one, so a retry after a
late delivery can land twice: docs/SERVING.md says how to avoid it).
"""

import asyncio
import logging
import threading
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from churn_assets.broker import BrokerError
from churn_assets.config import Settings
from churn_assets.kafka import make_producer
from serving.errors import Unavailable
from serving.mirror import LibrdkafkaLog, RateLimitedErrors

__all__ = ["DELIVERY_TIMEOUT_S", "FeedbackPublisher"]

log = logging.getLogger(__name__)

DELIVERY_TIMEOUT_S = 5.0
CLOSE_FLUSH_S = 2.0
POLL_INTERVAL_S = 0.05


class FeedbackPublisher:
    """One idempotent producer for ``ml.feedback`` with its own delivery-report thread."""

    def __init__(self, producer: Producer) -> None:
        self._producer = producer
        self._closed = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="feedback-delivery", daemon=True)
        self._poller.start()

    @classmethod
    def create(cls, settings: Settings) -> "FeedbackPublisher | None":
        """The publisher, or ``None`` (with a warning) when Kafka is not configured."""
        try:
            producer = make_producer(
                settings,
                **{
                    "message.timeout.ms": int(DELIVERY_TIMEOUT_S * 1000),
                    "linger.ms": 5,
                    # librdkafka's own lines through logging (debug), its errors one WARNING per
                    # 30 s: a broker that is down never floods the log (callers get their 503).
                    "logger": LibrdkafkaLog(logging.getLogger(f"{__name__}.librdkafka")),
                    "error_cb": RateLimitedErrors("feedback producer"),
                },
            )
        except (BrokerError, KafkaException) as exc:
            log.warning("feedback endpoint disabled until restart: %s", exc)
            return None
        return cls(producer)

    def _poll(self) -> None:
        while not self._closed.is_set():
            self._producer.poll(POLL_INTERVAL_S)

    async def publish(self, topic: str, key: bytes, value: bytes) -> None:
        """Hand one message to Kafka and wait (without blocking the loop) for the broker's
        acknowledgement of exactly it; :class:`Unavailable` when it was not delivered."""
        if self._closed.is_set():
            raise Unavailable("serving is stopping; feedback not accepted")
        loop = asyncio.get_running_loop()
        delivered: asyncio.Future[KafkaError | None] = loop.create_future()

        def report(error: KafkaError | None, _message: Any) -> None:
            # Delivery reports arrive on the poll thread.
            loop.call_soon_threadsafe(_settle, delivered, error)

        try:
            self._producer.produce(topic, key=key, value=value, on_delivery=report)
        except BufferError as exc:
            raise Unavailable(
                f"feedback not accepted (local Kafka queue full: {exc}); retry"
            ) from None
        except KafkaException as exc:
            raise Unavailable(f"feedback not accepted by the Kafka client: {exc}") from exc
        try:
            # librdkafka expires the message after DELIVERY_TIMEOUT_S and reports it; the margin
            # only covers the report's way back.
            error = await asyncio.wait_for(delivered, DELIVERY_TIMEOUT_S + 1.0)
        except TimeoutError:
            raise Unavailable(
                f"feedback could not be delivered to Kafka within {DELIVERY_TIMEOUT_S:.0f} s; retry"
            ) from None
        if error is not None:
            raise Unavailable(f"feedback was not delivered to Kafka ({error.str()}); retry")

    def close(self) -> None:
        """Flush for at most ``CLOSE_FLUSH_S``, then purge and stop: a stop never hangs on
        Kafka. Whatever is still queued belongs to requests already answered 503 or about to
        be ("retry"), so dropping it loses nothing a caller was told was accepted.
        Idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._poller.join(timeout=5)
        remaining = self._producer.flush(CLOSE_FLUSH_S)
        if remaining:
            log.warning("feedback producer: %d undelivered events dropped at stop", remaining)
            self._producer.purge(in_queue=True, in_flight=True, blocking=False)
            self._producer.flush(CLOSE_FLUSH_S)
        self._producer.close()


def _settle(future: "asyncio.Future[KafkaError | None]", error: KafkaError | None) -> None:
    if not future.done():  # the request may have given up waiting already
        future.set_result(error)
