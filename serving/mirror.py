"""Mirror prediction events to Kafka (``ml.predictions``) without blocking or failing a request.

:class:`PredictionMirror.publish` only encodes the event and hands it to librdkafka's in-memory
queue; delivery happens on librdkafka's threads and delivery reports are served by one daemon
thread of the mirror, off the request path. Whatever goes wrong (no broker, a full buffer, a
delivery that times out, an event that does not encode) the event is dropped, counted in
``mirror_dropped_total{reason=...}`` and logged: at debug level for every event, at warning level
once when a problem starts and at info level when it ends.
"""

import logging
import threading
import time
from collections.abc import Mapping
from datetime import datetime
from types import TracebackType
from typing import Any, Literal, Self

import orjson
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from churn_assets.broker import BrokerError
from churn_assets.config import Settings
from churn_assets.contract import Contract
from churn_assets.kafka import client_config
from churn_assets.schemas import MessageError, PredictionEvent, Topics, encode_message
from serving.metrics import MIRROR_DROP_REASONS, ServingMetrics

__all__ = ["DropReason", "LibrdkafkaLog", "PredictionMirror", "RateLimitedErrors"]

log = logging.getLogger(__name__)
_librdkafka_log = logging.getLogger(f"{__name__}.librdkafka")

DropReason = Literal["buffer_full", "delivery_failed", "broker_unavailable", "encode_error"]

POLL_INTERVAL_S = 0.1
CLOSE_FLUSH_S = 2.0
THREAD_JOIN_S = 5.0


class LibrdkafkaLog:
    """Routes librdkafka's log lines to Python logging (``logger``; the mirror's by default).

    With the broker down librdkafka logs every failed connection attempt at error level; the
    producers report that state themselves (the mirror once, via its error callback and drop
    counters; feedback through :class:`RateLimitedErrors` and its 503s), so librdkafka's lines
    go to debug. Configuration warnings stay warnings.
    """

    def __init__(self, logger: logging.Logger = _librdkafka_log) -> None:
        self._logger = logger

    def log(self, level: int, fmt: str, *args: Any) -> None:
        facility = args[0] if args else ""
        keep = level >= logging.WARNING and facility == "CONFWARN"
        self._logger.log(logging.WARNING if keep else logging.DEBUG, fmt, *args)


class RateLimitedErrors:
    """A Kafka ``error_cb`` that logs one WARNING per ``interval_s`` at most, saying how many
    errors it left out since the last one (a broker that is down reports every retry)."""

    def __init__(self, name: str, interval_s: float = 30.0) -> None:
        self._name = name
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._last: float | None = None
        self._left_out = 0

    def __call__(self, error: Any) -> None:
        now = time.monotonic()
        with self._lock:
            if self._last is not None and now - self._last < self._interval_s:
                self._left_out += 1
                return
            left_out, self._left_out, self._last = self._left_out, 0, now
        more = f" ({left_out} more since the last report)" if left_out else ""
        log.warning("%s: Kafka client error: %s%s", self._name, error, more)


def prediction_event_bytes(
    prediction: Any, features: Mapping[str, Any], predicted_at: datetime, model_name: str
) -> bytes:
    """The ``ml.predictions`` event (:class:`PredictionEvent`, status ``ok``) of an answered
    prediction, encoded straight to JSON. Its values were validated (the features, the ids) or
    computed (score, latency, version) by serving, so the event model is not built and checked
    again per prediction; a test holds it to what :class:`PredictionEvent` gives and accepts."""
    return orjson.dumps(
        {
            "schema_version": 1,
            "request_id": prediction.request_id,
            "customer_id": prediction.customer_id,
            "model_name": model_name,
            "model_version": prediction.model_version,
            "arm": prediction.arm,
            "score": prediction.probability,
            "latency_ms": prediction.latency_ms,
            "status": "ok",
            "error": None,
            "features": features,
            "predicted_at": predicted_at,
        },
        option=orjson.OPT_UTC_Z,
    )


class PredictionMirror:
    """Publishes :class:`PredictionEvent` s to ``ml.predictions``; never blocks, never raises.

    ``publish`` returns ``False`` when it drops the event at once; an event it accepted can still
    be dropped later when its delivery fails, which ``dropped`` and the metrics count. When the
    broker is not running at start the mirror runs disabled, and a ``publish`` at most every
    ``retry_interval_s`` asks the poll thread to try again, so a broker that comes up later is
    used. With the embedded broker, a broker restarted on a new address is followed the same way.
    Call :meth:`close` (or use the mirror as a context manager) to stop its thread.
    """

    def __init__(
        self,
        settings: Settings,
        metrics: ServingMetrics,
        *,
        buffer_messages: int = 100_000,
        delivery_timeout_ms: int = 5000,
        retry_interval_s: float = 30.0,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._buffer_messages = buffer_messages
        self._delivery_timeout_ms = delivery_timeout_ms
        self._retry_interval_s = retry_interval_s

        self._drop_counters = {
            reason: metrics.mirror_dropped_total.labels(reason=reason)
            for reason in MIRROR_DROP_REASONS
        }
        self._dropped_events = metrics.mirror_events_total.labels(outcome="dropped")
        self._delivered_events = metrics.mirror_events_total.labels(outcome="delivered")

        # Guards swapping the producer and produce() on it; never held for anything slow.
        self._producer_lock = threading.Lock()
        # One thread at a time serves delivery reports, and a producer is retired under it.
        self._poll_lock = threading.Lock()
        # Guards the counters and the set of ongoing problems.
        self._state_lock = threading.Lock()

        self._producer: Producer | None = None
        self._bootstrap: str | None = None
        self._delivered = 0
        self._dropped = 0
        self._problems: dict[str, int] = {}  # drop reason -> events dropped since it started
        self._brokers_down = False
        self._retry_at = time.monotonic() + retry_interval_s
        self._follow_at = 0.0
        self._closed = False
        self._stopping = threading.Event()
        self._reconnect = threading.Event()
        self._fatal = threading.Event()

        # A misconfiguration (KafkaConfigError, an invalid librdkafka property) fails at start.
        self._connect(at_start=True)
        self._thread = threading.Thread(
            target=self._run, name="prediction-mirror-poll", daemon=True
        )
        self._thread.start()

    # -- the request path -------------------------------------------------------------------

    def publish(self, event: PredictionEvent, contract: Contract | None = None) -> bool:
        """Queue ``event`` for delivery, its features checked against ``contract`` (default: the
        default contract); ``False`` when it was dropped (the reason is counted)."""
        try:
            value = encode_message(Topics.PREDICTIONS, event, contract)
        except (MessageError, ValueError) as exc:
            self._drop("encode_error", str(exc), getattr(event, "request_id", None))
            return False
        return self.publish_encoded(event.request_id, value)

    def publish_encoded(self, key: str, value: bytes) -> bool:
        """Queue an already encoded event (:func:`prediction_event_bytes`) keyed by its request
        id; ``False`` when it was dropped (the reason is counted)."""
        with self._producer_lock:
            producer = self._producer
            if producer is None:
                self._request_reconnect()
                reason: DropReason | None = "broker_unavailable"
                detail = "the mirror is closed" if self._closed else "no Kafka producer"
            else:
                try:
                    producer.produce(
                        Topics.PREDICTIONS, value, key=key.encode(), on_delivery=self._on_delivery
                    )
                    reason = None
                except BufferError as exc:
                    reason, detail = "buffer_full", f"local queue is full ({exc})"
                except KafkaException as exc:
                    reason, detail = "delivery_failed", f"produce refused: {exc}"
        if reason is not None:
            self._drop(reason, detail, key)
            return False
        if "buffer_full" in self._problems or "encode_error" in self._problems:
            self._recovered("buffer_full", "encode_error")
        return True

    def _request_reconnect(self) -> None:
        """Ask the poll thread to try connecting, at most every ``retry_interval_s``."""
        if self._closed:
            return
        now = time.monotonic()
        if now >= self._retry_at:
            self._retry_at = now + self._retry_interval_s
            self._reconnect.set()

    # -- counters and problem states ---------------------------------------------------------

    def _drop(self, reason: DropReason, detail: str, request_id: str | bytes | None) -> None:
        with self._state_lock:
            self._dropped += 1
            started = reason not in self._problems
            self._problems[reason] = self._problems.get(reason, 0) + 1
        self._drop_counters[reason].inc()
        self._dropped_events.inc()
        if started:
            log.warning(
                "prediction mirror is dropping events (%s): %s; counting them in "
                'mirror_dropped_total{reason="%s"}',
                reason,
                detail,
                reason,
            )
        log.debug("dropped prediction event %r (%s): %s", request_id, reason, detail)

    def _recovered(self, *reasons: str) -> None:
        with self._state_lock:
            ended = {r: self._problems.pop(r) for r in reasons if r in self._problems}
        for reason, count in ended.items():
            log.info("prediction mirror recovered from %s after %d dropped events", reason, count)

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        """Delivery report; runs on the poll thread (or in flush/close), never on a request."""
        if error is None:
            with self._state_lock:
                self._delivered += 1
                self._brokers_down = False
            self._delivered_events.inc()
            if "delivery_failed" in self._problems or "broker_unavailable" in self._problems:
                self._recovered("delivery_failed", "broker_unavailable")
            return
        self._drop("delivery_failed", str(error), message.key())

    def _on_error(self, error: KafkaError) -> None:
        """librdkafka's client-level errors (connection loss, fatal idempotence errors)."""
        if error.fatal():
            log.error("Kafka producer hit a fatal error and will be replaced: %s", error)
            self._fatal.set()
            return
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            with self._state_lock:
                started = not self._brokers_down
                self._brokers_down = True
            if started:
                log.warning(
                    "prediction mirror cannot reach Kafka (%s); events are dropped if this "
                    "lasts longer than %d ms",
                    error,
                    self._delivery_timeout_ms,
                )
                return
        log.debug("Kafka producer error: %s", error)

    # -- the producer's life cycle (poll thread, start and close) ----------------------------

    def _producer_config(self, base: dict[str, Any]) -> dict[str, Any]:
        return {
            **base,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "queue.buffering.max.messages": self._buffer_messages,
            "message.timeout.ms": self._delivery_timeout_ms,
            "socket.timeout.ms": 5000,
            "socket.connection.setup.timeout.ms": 5000,
            "reconnect.backoff.ms": 100,
            "reconnect.backoff.max.ms": 2000,
            "logger": LibrdkafkaLog(),
            "error_cb": self._on_error,
        }

    def _connect(self, *, at_start: bool = False) -> bool:
        """Create the producer; on failure the mirror stays (or becomes) disabled."""
        try:
            base = client_config(self._settings)
        except BrokerError as exc:
            self._mark_unavailable(str(exc))
            return False
        try:
            producer = Producer(self._producer_config(base))
        except KafkaException as exc:
            if at_start:
                raise
            log.error("prediction mirror could not create a Kafka producer: %s", exc)
            self._mark_unavailable(str(exc))
            return False
        with self._producer_lock:
            self._producer = producer
            self._bootstrap = str(base["bootstrap.servers"])
        log.info("prediction mirror publishing to %s on %s", Topics.PREDICTIONS, self._bootstrap)
        self._recovered("broker_unavailable")
        return True

    def _mark_unavailable(self, detail: str) -> None:
        with self._state_lock:
            started = "broker_unavailable" not in self._problems
            self._problems.setdefault("broker_unavailable", 0)
        if started:
            log.warning(
                "prediction mirror is disabled, events will be dropped: %s "
                "(retrying at most every %.0f s while requests arrive)",
                detail,
                self._retry_interval_s,
            )
        else:
            log.debug("prediction mirror still cannot connect: %s", detail)

    def _retire_producer(self, flush_s: float) -> None:
        """Flush briefly, then purge; purged events are counted as ``delivery_failed``."""
        with self._producer_lock:
            producer, self._producer = self._producer, None
            self._bootstrap = None
        if producer is None:
            return
        with self._poll_lock:
            remaining = producer.flush(flush_s)
            if remaining:
                producer.purge(in_queue=True, in_flight=True, blocking=True)
                remaining = producer.flush(1.0)
            if remaining:
                log.error("%d prediction events were left in a retired producer", remaining)
            producer.close()

    def _follow_embedded_broker(self) -> None:
        """Reconnect when the embedded broker was restarted on another address."""
        if not self._settings.kafka.uses_embedded_broker:
            return
        if "delivery_failed" not in self._problems and not self._brokers_down:
            return
        now = time.monotonic()
        if now < self._follow_at:
            return
        self._follow_at = now + self._retry_interval_s
        try:
            bootstrap = client_config(self._settings)["bootstrap.servers"]
        except BrokerError as exc:
            log.debug("embedded broker not found while Kafka is unreachable: %s", exc)
            return
        if bootstrap != self._bootstrap:
            log.warning(
                "embedded broker moved from %s to %s; reconnecting the prediction mirror",
                self._bootstrap,
                bootstrap,
            )
            self._retire_producer(0.0)
            self._connect()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._tick()
            except Exception:
                # Delivery reports must keep flowing: a bug here is logged loudly, not fatal.
                log.exception("prediction mirror poll loop failed; continuing")
                self._stopping.wait(1.0)

    def _tick(self) -> None:
        if self._fatal.is_set():
            self._fatal.clear()
            self._retire_producer(0.0)
            self._connect()
        producer = self._producer
        if producer is None:
            if self._reconnect.wait(POLL_INTERVAL_S):
                self._reconnect.clear()
                if not self._stopping.is_set():
                    self._connect()
            return
        with self._poll_lock:
            if producer is self._producer:
                producer.poll(POLL_INTERVAL_S)
        self._follow_embedded_broker()

    # -- public control ----------------------------------------------------------------------

    def flush(self, timeout_s: float = 5.0) -> int:
        """Wait up to ``timeout_s`` for queued events to be delivered or fail; returns how many
        are still queued."""
        with self._poll_lock:
            producer = self._producer
            if producer is None:
                return 0
            return int(producer.flush(timeout_s))

    def close(self) -> None:
        """Stop the poll thread, flush briefly and release the producer. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        self._reconnect.set()
        self._thread.join(THREAD_JOIN_S)
        if self._thread.is_alive():
            log.error("prediction mirror poll thread did not stop within %.0f s", THREAD_JOIN_S)
        self._retire_producer(CLOSE_FLUSH_S)
        log.info("prediction mirror closed: %d delivered, %d dropped", self.delivered, self.dropped)

    @property
    def connected(self) -> bool:
        """Whether a producer exists (the broker was found); says nothing of its health."""
        return self._producer is not None

    @property
    def dropped(self) -> int:
        """Events dropped so far, for any reason."""
        with self._state_lock:
            return self._dropped

    @property
    def delivered(self) -> int:
        """Events the broker acknowledged so far."""
        with self._state_lock:
            return self._delivered

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
