"""A job's whole life through the real worker: retries, refusals, cancels, crashes
(README, How it works). Each rule alone, in-process and on both databases, is in
tests/worker/test_steps.py (a stalled video's timeout only there: here it would take
VIDEO_TIMEOUT_SECONDS). The test stack runs with MAX_RETRIES=3,
RETRY_COUNTDOWN_SECONDS=1, VIDEO_TIMEOUT_SECONDS=60, LEASE_SECONDS=3."""

from __future__ import annotations

import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import psutil
import pytest
import redis
from sqlalchemy import func, select

from kinora.core.db import session_scope
from kinora.core.models import CreditEntry, User, VideoStatus
from kinora.worker.engines.mock import prompt_key
from tests.utils.accounts import Account, make_account
from tests.utils.clients import events_of, read_stream, submit
from tests.utils.processes import Stack, wait_for
from tests.utils.rows import video_row

pytestmark = pytest.mark.slow


def model_jobs(client: redis.Redis, prompt: str) -> int:
    """Jobs the mock model created for this prompt: what the user paid the model for."""
    return int(client.zcard(prompt_key(prompt)))


def balance_matches_ledger(account: Account) -> tuple[int, int]:
    with session_scope() as session:
        credits = session.scalar(select(User.credits).where(User.id == account.id))
        total = session.scalar(
            select(func.sum(CreditEntry.amount)).where(CreditEntry.user_id == account.id)
        )
    return int(credits or 0), int(total or 0)


def whole_story(events: list[dict[str, Any]]) -> None:
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    progress = [e["progress"] for e in events if "progress" in e]
    assert progress == sorted(progress)
    assert [e["type"] for e in events].count("complete") == 1
    assert events[-1]["type"] == "complete"


def test_a_transient_failure_is_retried_and_completes(
    stack: Stack, account: Account, redis_client: redis.Redis
) -> None:
    prompt = f"[mock:transient] a fox in the snow {account.email}"
    created = submit(stack, account, prompt)
    _, lines = read_stream(created["stream_url"])
    events = events_of(lines)

    whole_story(events)
    errors = [e for e in events if e["type"] == "error"]
    assert len(errors) == 1
    assert errors[0]["is_retryable"] is True
    assert (errors[0]["retry_count"], errors[0]["max_retries"]) == (0, 3)
    assert errors[0]["error_code"] == "server_error"
    assert events[-1]["status"] == "completed"
    assert model_jobs(redis_client, prompt) == 1
    assert video_row(created["video_id"]).attempts == 2
    assert balance_matches_ledger(account) == (900, 900)


def test_a_content_policy_refusal_fails_at_once_and_refunds(stack: Stack, account: Account) -> None:
    created = submit(stack, account, "[mock:policy] something the model refuses")
    _, lines = read_stream(created["stream_url"])
    events = events_of(lines)

    whole_story(events)
    (error,) = [e for e in events if e["type"] == "error"]
    assert error["is_retryable"] is False
    assert error["error_code"] == "moderation_blocked"
    assert events[-1]["status"] == "failed"
    video = video_row(created["video_id"])
    assert video.status == VideoStatus.FAILED
    assert video.attempts == 1
    assert "moderation" in (video.error_message or "")
    assert balance_matches_ledger(account) == (1000, 1000)


def cancel(stack: Stack, account: Account, video_id: int) -> httpx.Response:
    with stack.client(account) as client:
        return client.post(f"/api/v1/videos/{video_id}/cancel")


def test_cancel_stops_the_work_and_refunds_once(
    stack: Stack, account: Account, redis_client: redis.Redis
) -> None:
    prompt = f"A slow sunrise to cancel {account.email}"
    created = submit(stack, account, prompt)
    video_id = created["video_id"]
    _, head = read_stream(created["stream_url"], limit=8)  # well into generating

    first = cancel(stack, account, video_id)
    second = cancel(stack, account, video_id)

    assert first.status_code == 200
    assert first.json()["status"] == "cancelled"
    assert second.status_code == 200  # harmless
    _, rest = read_stream(created["stream_url"], headers={"Last-Event-ID": "8"})
    events = events_of(head) + events_of(rest)
    whole_story(events)
    assert events[-1]["status"] == "cancelled"
    assert balance_matches_ledger(account) == (1000, 1000)
    # the worker notices (its claim is gone), stops, and keeps no file
    from kinora.jobs import dispatch

    result = dispatch.celery().AsyncResult(created["task_id"]).get(timeout=20)
    assert result == {"status": "abandoned", "video_id": video_id, "video_status": "cancelled"}
    video = video_row(video_id)
    assert video.status == VideoStatus.CANCELLED
    assert video.file_path is None
    assert model_jobs(redis_client, prompt) == 1


def test_cancel_raced_against_completion_refunds_exactly_once(
    stack: Stack, environment: dict[str, str]
) -> None:
    account = make_account(credits=10_000)
    outcomes = []
    for delay in (0.0, 0.6, 1.2, 1.8, 2.4, 3.0):  # from queued to past the end
        created = submit(stack, account, f"Race number {delay} against the finish line")
        time.sleep(delay)
        response = cancel(stack, account, created["video_id"])
        assert response.status_code in (200, 409), response.text
        _, lines = read_stream(created["stream_url"])
        events = events_of(lines)
        whole_story(events)
        status = video_row(created["video_id"]).status
        assert events[-1]["status"] == status
        assert (response.status_code == 200) == (status == VideoStatus.CANCELLED)
        outcomes.append(status)
    assert VideoStatus.CANCELLED in outcomes
    cancelled = outcomes.count(VideoStatus.CANCELLED)
    credits, ledger = balance_matches_ledger(account)
    assert credits == ledger == 10_000 - 100 * (len(outcomes) - cancelled)


def test_cancelling_a_completed_video_says_so(stack: Stack, account: Account) -> None:
    created = submit(stack, account, "A quick clip that finishes first")
    read_stream(created["stream_url"])
    response = cancel(stack, account, created["video_id"])
    assert response.status_code == 409
    assert "already completed" in response.json()["detail"]
    assert balance_matches_ledger(account) == (900, 900)


def test_the_task_enqueued_five_times_with_two_workers_runs_once(
    stack: Stack, account: Account, redis_client: redis.Redis
) -> None:
    from kinora.worker.tasks import generate_video

    prompt = f"Five deliveries of one video {account.email}"
    created = submit(stack, account, prompt)
    extra = [generate_video.apply_async(args=[created["video_id"]]) for _ in range(4)]
    _, lines = read_stream(created["stream_url"])
    results = [r.get(timeout=60)["status"] for r in extra]

    whole_story(events_of(lines))
    assert results.count("completed") <= 1
    assert set(results) <= {"completed", "skipped"}
    assert model_jobs(redis_client, prompt) == 1
    assert video_row(created["video_id"]).attempts == 1


def test_a_worker_killed_mid_generation_still_completes_with_one_model_job(
    stack: Stack, account: Account, redis_client: redis.Redis
) -> None:
    prompt = f"A crash in the middle of the night {account.email}"
    created = submit(stack, account, prompt)
    video_id = created["video_id"]
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(read_stream(created["stream_url"])[1]))
    reader.start()

    wait_for("the model job", lambda: video_row(video_id).model_job_id is not None, timeout=20)
    for child in psutil.Process(stack.worker.pid).children(recursive=True):
        child.send_signal(signal.SIGKILL)  # the pool processes: a crash, not a shutdown
    reader.join(60)

    assert not reader.is_alive()
    events = events_of(lines)
    whole_story(events)
    assert events[-1]["status"] == "completed"
    assert model_jobs(redis_client, prompt) == 1
    video = video_row(video_id)
    assert video.status == VideoStatus.COMPLETED
    assert video.attempts == 2, [e["message"] for e in events]  # taken over after the crash
    # The redelivered task waited out the dead worker's claim, and said so.
    assert any("stopped answering" in e["message"] for e in events)
    assert balance_matches_ledger(account) == (900, 900)


def png_data_url(size: tuple[int, int] = (32, 32)) -> str:
    import base64
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


@pytest.mark.parametrize(
    ("image_url", "expected"),
    [
        ("data:image/png;base64,R0lGODlhAQABAAAAACw=", "PNG or JPEG"),  # a GIF
        ("data:image/png;base64,not-base64!!", "base64"),
        ("data:image/png;base64," + "A" * (14 * 2**20), "larger than 10 MB"),
    ],
)
def test_a_bad_inline_reference_image_is_422_and_charges_nothing(
    stack: Stack, environment: dict[str, str], image_url: str, expected: str
) -> None:
    account = make_account()
    with stack.client(account) as client:
        response = client.post(
            "/api/v1/videos/generate", json={"prompt": "A bad reference", "image_url": image_url}
        )
    assert response.status_code == 422
    assert response.json()["detail"].startswith("image_url: ")
    assert expected in response.json()["detail"]
    assert balance_matches_ledger(account) == (1000, 1000)


def test_a_reference_image_at_a_name_that_resolves_inside_is_refused_and_refunded(
    stack: Stack, account: Account
) -> None:
    """This machine's own name passes the submit (a name is judged once resolved); the
    worker resolves it, refuses it before connecting (the listener sees nothing), and
    the error says "refused", not what is listening there."""
    seen: list[str] = []

    class Inside(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            self.send_error(404)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Inside)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        url = f"http://{socket.gethostname()}:{server.server_address[1]}/missing.png"
        created = submit(stack, account, "With an inside picture", image_url=url)
        _, lines = read_stream(created["stream_url"])
    finally:
        server.shutdown()
        server.server_close()
    events = events_of(lines)
    whole_story(events)
    (error,) = [e for e in events if e["type"] == "error"]
    assert error["error_code"] == "invalid_reference_image"
    assert "refused: its host is not a public address" in error["message"]
    assert "404" not in error["message"]
    assert seen == []
    assert events[-1]["status"] == "failed"
    assert video_row(created["video_id"]).file_path is None
    assert balance_matches_ledger(account) == (1000, 1000)


def test_a_reference_image_is_used(stack: Stack, account: Account) -> None:
    created = submit(stack, account, "From a blue square", image_url=png_data_url())
    _, lines = read_stream(created["stream_url"])
    events = events_of(lines)
    whole_story(events)
    assert "Reference image ready (1280x720)" in [e["message"] for e in events]
    assert events[-1]["status"] == "completed"
