"""The videos whose message a worker has received and not yet started.

A worker takes a message from the broker before a pool process is free for it (and
keeps a retry's message until its countdown), unacknowledged. If the worker dies
then, the broker gives the message back only after its visibility timeout (the
longest a video may take, plus ten minutes), and the video would sit pending that
long. So the worker's main process holds each such video in the database, under a
lease it renews (store.hold); the claim of the pool process that starts the video
replaces the hold. A dead worker's holds run out, and the sweep queues those videos
again within seconds. A stopping worker hands its messages back to the broker, and
drops its holds.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from kinora.core.config import get_settings
from kinora.core.db import session_scope
from kinora.jobs import dispatch, store

log = logging.getLogger(__name__)


def holder() -> str:
    """This worker's main process (the claims of its pool processes name theirs)."""
    return f"{socket.gethostname()}:{os.getpid()}:held"


def received(request: Any) -> None:
    """Celery's task_received, in the worker's main process."""
    if request.name != dispatch.GENERATE_VIDEO:
        return
    args, kwargs = request.args or (), request.kwargs or {}
    video_id = args[0] if args else kwargs.get("video_id")
    if not isinstance(video_id, int):
        return
    try:
        with session_scope() as session:
            store.hold(session, video_id, holder(), get_settings().lease_seconds)
    except Exception:
        # Unheld, the video is still queued again if this worker dies: later, by the
        # sweep of long-pending videos.
        log.exception("could not hold video %s", video_id)


def renew() -> None:
    with session_scope() as session:
        store.renew_holds(session, holder(), get_settings().lease_seconds)


def drop() -> None:
    try:
        with session_scope() as session:
            store.drop_holds(session, holder())
    except Exception:  # they run out instead, and the sweep queues the videos again
        log.exception("could not drop this worker's holds")
