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


def video_of(request: Any) -> int | None:
    """The video a generation task's request is for (None for any other task)."""
    if request.name != dispatch.GENERATE_VIDEO:
        return None
    args, kwargs = request.args or (), request.kwargs or {}
    video_id = args[0] if args else kwargs.get("video_id")
    return video_id if isinstance(video_id, int) else None


def kept() -> set[int]:
    """The videos whose message this worker still has. When its broker connection
    breaks, Celery forgets the messages it had received and not started (reserved, or
    waiting for a retry's countdown): those come back from the broker, or are lost with
    a primary that failed over before its replica had them; either way this worker no
    longer holds them."""
    from celery.worker import state

    found = (video_of(request) for request in list(state.requests.values()))
    return {video for video in found if video is not None}


def received(request: Any) -> None:
    """Celery's task_received, in the worker's main process."""
    video_id = video_of(request)
    if video_id is None:
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
        store.renew_holds(session, holder(), get_settings().lease_seconds, kept())


def drop() -> None:
    try:
        with session_scope() as session:
            store.drop_holds(session, holder())
    except Exception:  # they run out instead, and the sweep queues the videos again
        log.exception("could not drop this worker's holds")
