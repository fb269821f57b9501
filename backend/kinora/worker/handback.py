"""Warm shutdown of a worker: its running videos go back to the queue.

A stopping worker (SIGTERM, `docker compose stop`, a deploy) should not sit on a
video until the model finishes it, nor leave it to the sweeper after its lease runs
out. The worker's main process creates one flag before it forks its pool and raises
it when Celery starts shutting down; a job checks the flag between steps (and wakes
from its polling sleep when it goes up), gives its claim back, and queues the video
again, where another worker resumes the same model job without paying twice.
The finalizing stage (download, save, thumbnail) is short and is finished instead.
"""

from __future__ import annotations

import multiprocessing
import time
from multiprocessing.synchronize import Event

_flag: Event | None = None


class HandBack(Exception):
    """The worker is shutting down: the job gives its video back to the queue."""

    silent = True  # the job tells the watchers itself; the logger adds no error event


def arm() -> None:
    """In the worker's main process, before its pool forks: the children share it."""
    global _flag
    _flag = multiprocessing.get_context("fork").Event()


def begin() -> None:
    """The worker is shutting down (its main process, on Celery's signal)."""
    if _flag is not None:
        _flag.set()


def requested() -> bool:
    return _flag is not None and _flag.is_set()


def sleep(seconds: float) -> None:
    """Sleep, unless the worker starts shutting down meanwhile: then HandBack."""
    if _flag is None:
        time.sleep(seconds)
    elif _flag.wait(seconds):
        raise HandBack
