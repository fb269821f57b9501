"""Events a process could not publish (Redis unreachable, paused, failing over), kept
in order and published once Redis answers again (docs/library.md; README, Faults).

Publishing never blocks a job for long (the worker's Redis calls time out in
seconds) and never loses what it had to say: a retry notice written while Redis was
paused reaches the watchers when it is back, not never. A video's events stay in
order: while any of its events waits here, its new ones queue behind them. Each
event gets its seq when it is finally published, so numbering stays gapless.

One outbox per process, drained by a daemon thread that exists only while something
waits; what a process still holds when it dies is lost (the database keeps the
video's truth, and streams that miss events are told so).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import redis

from kinora.streaming.keys import StreamKey

log = logging.getLogger(__name__)

RETRY_SECONDS = 1.0


@dataclass
class Pending:
    key: StreamKey
    send: Callable[[], object]  # publishes the event; raises redis.RedisError


class Outbox:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: deque[Pending] = deque()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def _reset_after_fork(self) -> None:
        if self._pid != os.getpid():  # a forked child: the parent's thread is not here
            self._lock = threading.Lock()
            self._queue = deque()
            self._thread = None
            self._pid = os.getpid()

    def holds(self, key: StreamKey) -> bool:
        self._reset_after_fork()
        return any(p.key == key for p in self._queue)

    def __len__(self) -> int:
        self._reset_after_fork()
        return len(self._queue)

    def add(self, pending: Pending) -> None:
        self._reset_after_fork()
        with self._lock:
            self._queue.append(pending)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._drain_until_empty, daemon=True, name="kinora-outbox"
                )
                self._thread.start()

    def clear(self) -> int:
        """Forget everything waiting (for a Redis that will never come back); returns
        how many events were dropped."""
        self._reset_after_fork()
        with self._lock:
            dropped = len(self._queue)
            self._queue.clear()
            return dropped

    def flush(self) -> bool:
        """Publish what waits, in order, until one fails; True when nothing is left."""
        self._reset_after_fork()
        with self._lock:
            while self._queue:
                try:
                    self._queue[0].send()
                except redis.RedisError:
                    return False
                self._queue.popleft()
            return True

    def _drain_until_empty(self) -> None:
        while True:
            if self.flush():
                log.info("events held while Redis was unreachable are published")
                return
            threading.Event().wait(RETRY_SECONDS)


OUTBOX = Outbox()
