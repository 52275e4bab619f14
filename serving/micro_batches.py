"""Work handed off the request path and done in micro-batches on a thread of its own.

Shadow scoring uses it: each answered request queues its shadow work and returns; the thread
takes everything queued since its last pass (at most ``max_items``) and hands it to the handler
at once, so under load one transform and one model call serve many requests. With ``linger_s``
the thread, woken by a first item, waits that long for others to join it before a pass: fewer,
larger passes, each taking the interpreter's lock from the request threads once.
"""

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["MicroBatches"]

log = logging.getLogger(__name__)


class MicroBatches:
    """Calls ``handler(items)`` on one thread with the items submitted since its last call.

    ``submit`` never blocks; ``drain`` waits until everything submitted before it was handled;
    ``close`` handles what is queued and stops the thread. A handler's exception is logged and
    the thread goes on (the handler counts its own failures).
    """

    def __init__(
        self,
        handler: Callable[[list[Any]], None],
        *,
        name: str,
        max_items: int = 256,
        linger_s: float = 0.0,
    ) -> None:
        self._handler = handler
        self._max_items = max_items
        self._linger_s = linger_s
        self._queue: deque[Any] = deque()
        self._wake = threading.Condition()
        self._submitted = 0
        self._handled = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, *item: Any) -> None:
        with self._wake:
            if self._closed:
                raise RuntimeError("micro-batches closed: no more work is taken")
            self._queue.append(item)
            self._submitted += 1
            if len(self._queue) == 1:  # the thread waits only on an empty queue
                self._wake.notify_all()

    def drain(self, timeout_s: float = 10.0) -> None:
        """Wait until the work submitted so far has been handled; ``TimeoutError`` if not
        within ``timeout_s``."""
        with self._wake:
            target = self._submitted
            if not self._wake.wait_for(lambda: self._handled >= target, timeout=timeout_s):
                raise TimeoutError(
                    f"{self._handled} of {target} micro-batch items handled in {timeout_s} s"
                )

    def close(self, timeout_s: float = 30.0) -> None:
        """Handle what is queued, then stop the thread. Idempotent."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return  # closed and nothing left
                if self._linger_s > 0:  # submits do not wake it (the queue is not empty)
                    self._wake.wait_for(lambda: self._closed, timeout=self._linger_s)
                count = min(len(self._queue), self._max_items)
                items = [self._queue.popleft() for _ in range(count)]
            try:
                self._handler(items)
            except Exception:
                log.exception("%s: handling %d items failed", self._thread.name, len(items))
            with self._wake:
                self._handled += len(items)
                self._wake.notify_all()
