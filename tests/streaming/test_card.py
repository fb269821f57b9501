"""The design card's own call (docs/library.md): `SSELogger(video_id)` in a Celery task of
another app, run by a Celery worker that is not Kinora's, is that video's stream. A
watcher of `GET /api/v1/videos/<id>/stream` receives its lines in the video's `seq`."""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from celery import Celery

from kinora.core.db import session_scope
from kinora.core.models import Video, VideoStatus, utcnow
from kinora.streaming import SSELogger
from tests.utils.accounts import Account
from tests.utils.clients import events_of, read_stream
from tests.utils.processes import Stack, stop, wait_for

CARD_APP = """
from celery import Celery
import os

from kinora.events import SSELogger

app = Celery("card", broker=os.environ["REDIS_URL"])
app.conf.task_default_queue = "card"


@app.task(name="card.render")
def render(video_id):
    with SSELogger(video_id) as log:
        log.step(1, "Validating request parameters...")
        log.step(5, "Processing video...", progress=58)
        log.complete(video_url="https://example.invalid/v.mp4")
"""


def processing_video(account: Account) -> int:
    """A video of `account` that some other app's task works on: it is not queued, and
    its claim's lease runs an hour, so Kinora's sweeper leaves it to that app."""
    with session_scope() as session:
        video = Video(
            user_id=account.id, status=VideoStatus.PROCESSING, prompt="made by another app",
            cost=0, task_id="card", claimed_by="card-app",
            lease_expires_at=utcnow() + timedelta(hours=1),
        )  # fmt: skip
        session.add(video)
        session.flush()
        return video.id


def test_sselogger_of_a_video_id_reaches_that_videos_watchers_from_another_apps_task(
    stack: Stack, account: Account, environment: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "card_app.py").write_text(CARD_APP)
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "card_app", "worker", "-Q", "card",
             "--pool", "prefork", "--concurrency", "1", "--loglevel", "INFO"],
            cwd=tmp_path, env=environment, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    video_id = processing_video(account)
    url = f"{stack.base_url}/api/v1/videos/{video_id}/stream"
    seen: dict[str, tuple[int, list[str]]] = {}
    watcher = threading.Thread(
        target=lambda: seen.setdefault("stream", read_stream(url, headers=account.headers,
                                                             timeout=40)),
    )  # fmt: skip
    try:
        wait_for(lambda: f"the card app's worker: {log.read_text()}",
                 lambda: b"ready." in log.read_bytes(), timeout=30)  # fmt: skip
        watcher.start()
        wait_for("the watcher to be live", lambda: _watchers(stack, account, video_id) == 1, 10)
        card = Celery("card", broker=environment["REDIS_URL"])
        try:
            card.send_task("card.render", args=[video_id], queue="card")
        finally:
            card.close()
        watcher.join(45)
        assert not watcher.is_alive(), "the video's stream did not end with the card's complete"
    finally:
        stop(worker)
    status, lines = seen["stream"]
    assert status == 200
    events = events_of(lines)
    assert [(e["video_id"], e["seq"], e["type"]) for e in events] == [
        (video_id, 1, "log"), (video_id, 2, "progress"), (video_id, 3, "complete"),
    ]  # fmt: skip
    assert events[1]["progress"] == 58
    assert events[0]["message"] == "Validating request parameters..."


def _watchers(stack: Stack, account: Account, video_id: int) -> int:
    with stack.client(account) as client:
        return int(client.get(f"/api/v1/videos/{video_id}/connections").json()["connections"])


@pytest.mark.parametrize("video_id", [7, "7"])
def test_the_default_kind_is_video_and_other_kinds_name_themselves(video_id: int | str) -> None:
    assert SSELogger(video_id).key.channel == "video:7"
    assert SSELogger(video_id, kind="import").key.channel == "import:7"


def test_a_video_id_that_is_no_number_says_to_name_the_kind() -> None:
    with pytest.raises(ValueError, match='kind="job"'):
        SSELogger("csv-import-1")
