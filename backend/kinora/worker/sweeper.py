"""The sweeper: a thread in every worker's main process that keeps videos from getting
stuck (README, How it works).

Every SWEEP_INTERVAL_SECONDS it fails and refunds videos past VIDEO_TIMEOUT_SECONDS,
and queues again the videos whose claim or hold expired (their worker died and the
broker did not hand the message to another) or that stayed pending too long (a lost
message). Between sweeps it renews this worker's holds (kinora.worker.holds). A
worker-side loop rather than Celery beat: no extra process to run and keep single,
since every change the sweep makes is a conditional update that any number of
sweepers can race safely; a duplicate message is skipped at the claim.
"""

from __future__ import annotations

import logging
import threading
import time

from kinora.core.config import get_settings
from kinora.core.db import session_scope
from kinora.jobs import dispatch, event_floor, store, webhooks
from kinora.streaming.logger import sync_client
from kinora.worker import holds

log = logging.getLogger(__name__)


def sweep_once(*, at_start: bool = False) -> store.Sweep:
    """One sweep. `at_start` (a worker's first): every pending video is queued again at
    once, not only those pending for STALE_PENDING_SECONDS: after a restart on data that
    lost its queue, nothing waits minutes. The claim makes any duplicate a no-op."""
    settings = get_settings()
    with session_scope() as session:
        found = store.sweep(
            session,
            # A live worker fails its own video at the deadline; the sweeper waits a
            # lease longer, so it only catches the videos of dead workers.
            video_timeout=settings.video_timeout_seconds + settings.lease_seconds,
            stale_pending=0 if at_start else settings.stale_pending_seconds,
        )
    for video_id in found.timed_out:
        with event_floor.video_logger(
            video_id, on_complete=event_floor.end_recorder(video_id)
        ) as events:
            message = f"generation took longer than {settings.video_timeout_seconds:g} s"
            events.error(message, error_code="timeout", is_retryable=False)
            events.complete(status="failed", reason=message)
        webhooks.notify(video_id, "failed")
    if found.requeue:
        for video_id in found.requeue:
            with event_floor.video_logger(video_id) as events:
                # Refused by the event store if the video ended meanwhile (cancelled).
                events.log("Its worker stopped answering: queued again")
            dispatch.generate_video(video_id)
    if found.timed_out or found.requeue:
        log.info("sweep: timed out %s, queued again %s", found.timed_out, found.requeue)
    return found


class Sweeper:
    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="kinora-sweeper")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        settings = get_settings()
        interval = settings.sweep_interval_seconds
        # The holds of this worker (kinora.worker.holds) are renewed well within their
        # lease, whatever the sweep interval.
        tick = min(interval, settings.lease_seconds / 3)
        at_start = True
        next_sweep = time.monotonic()
        while True:
            try:
                holds.renew()
            except Exception:
                log.exception("could not renew this worker's holds")
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + interval
                try:
                    lost = redis_lost_its_data()
                    if lost and not at_start:  # at start, all pending are queued again anyway
                        log.warning("Redis lost its data: every pending video is queued again")
                    sweep_once(at_start=at_start or lost)
                    at_start = False
                except Exception:
                    log.exception("sweep failed; trying again in %s s", interval)
            if self._stop.wait(tick):
                return


# Set by the sweepers and never expiring: when it is gone, Redis lost its data (a
# flush, a restart without its files, a failover to an empty replica), and the queued
# messages with it; the pending videos are queued again at once, not after
# STALE_PENDING_SECONDS.
MARKER = "kinora:sweeper:marker"


def redis_lost_its_data() -> bool:
    """True once after Redis lost its data (and at the very first sweep of a new
    Redis, when there is nothing to lose)."""
    settings = get_settings()
    broker = settings.broker_url or settings.required_redis_url  # where the queue is
    return bool(sync_client(broker).set(MARKER, 1, nx=True))
