"""The worker's claim on a video, renewed in a background thread while it works, so
that only a dead worker's claim runs out (and the sweeper or a redelivery takes the
video over)."""

from __future__ import annotations

import logging
import threading
from types import TracebackType
from typing import Self

from kinora.core.config import get_settings
from kinora.core.db import session_scope
from kinora.jobs import store
from kinora.worker.job import Job

log = logging.getLogger(__name__)


class Lease:
    """Renews the worker's claim in a background thread while the job runs, so that
    only a dead worker's claim expires. `lost` turns true when the video is no longer
    ours (cancelled, timed out and failed by a sweeper)."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.seconds = get_settings().lease_seconds
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, daemon=True, name="lease")

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(5)

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                with session_scope() as session:
                    if not store.renew(session, self.job.video_id, self.job.owner, self.seconds):
                        self.lost.set()
                        return
            except Exception:
                log.exception("could not renew the claim on video %s", self.job.video_id)
