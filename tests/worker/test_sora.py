"""The real Sora engine (the official `openai` SDK) against a local fake of the
videos API under uvicorn, alone and driving a whole generation."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import av
import httpx
import pytest
import redis
from PIL import Image
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError

from kinora.cli.embedded import free_port
from kinora.core.db import session_scope
from kinora.core.models import User, Video, VideoStatus, utcnow
from kinora.jobs import store
from kinora.streaming import keys
from kinora.streaming.events import parse
from kinora.worker import attempt
from kinora.worker.engines.base import ModelJob, PolicyRefusal
from kinora.worker.engines.sora import SoraEngine
from tests.utils.accounts import Account, make_account
from tests.utils.processes import stop, wait_for
from tests.utils.rows import video_row

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fake_api(environment: dict[str, str]) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "tests.utils.fake_videos_api:create_app", "--factory",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        cwd=ROOT,
        env=environment,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert process.poll() is None, "the fake videos API exited"
        try:
            return httpx.get(f"{url}/_stats", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for("the fake videos API", up, timeout=30)
        yield url
    finally:
        stop(process)


_made: list[SoraEngine] = []


@pytest.fixture(autouse=True)
def _close_engines() -> Iterator[None]:
    """Every engine a test made is closed after it: none leaves its connections open."""
    yield
    while _made:
        _made.pop().close()


def engine(fake_api: str, timeout: float = 1.0) -> SoraEngine:
    made = SoraEngine(api_key="sk-test", base_url=f"{fake_api}/v1", timeout=timeout)
    _made.append(made)
    return made


def stats(fake_api: str) -> dict[str, Any]:
    result: dict[str, Any] = httpx.get(f"{fake_api}/_stats", timeout=5).json()
    return result


def new_video(account: Account, prompt: str, **parameters: Any) -> int:
    with session_scope() as session:
        user = session.get(User, account.id)
        assert user is not None
        video, _ = store.create_video(
            session,
            user,
            prompt=prompt,
            parameters={"seconds": 4, "size": "720x1280", **parameters},
            cost=100,
            task_id="in-process",
        )
    return video.id


def events(client: redis.Redis, video_id: int) -> list[dict[str, Any]]:
    raw: list[bytes] = client.zrange(keys.video(video_id).history, 0, -1)  # type: ignore[assignment]
    return [dict(parse(r)) for r in raw]


def test_engine_creates_polls_and_downloads(fake_api: str, tmp_path: Path) -> None:
    sora = engine(fake_api)
    job: ModelJob = sora.create(prompt="A kite over the dunes", seconds=4, size="720x1280")
    assert job.poll_after == 0.1  # the server's openai-poll-after-ms hint
    deadline = time.monotonic() + 20
    while job.status != "completed":
        assert time.monotonic() < deadline
        time.sleep(job.poll_after or 0.1)
        job = sora.retrieve(job.id)
    sora.download(job.id, tmp_path / "out.mp4")
    with av.open(str(tmp_path / "out.mp4"), "r") as container:
        frame = next(container.decode(video=0))
    assert (frame.width, frame.height) == (720, 1280)


def test_a_whole_generation_through_the_sora_engine(
    fake_api: str, account: Account, redis_client: redis.Redis
) -> None:
    image = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 40, 40)).save(image, "PNG")
    data_url = "data:image/png;base64," + base64.b64encode(image.getvalue()).decode()
    prompt = f"A red square comes alive {account.email}"
    video_id = new_video(account, prompt, image_url=data_url)

    result = attempt.run(video_id, task_id="sora-1", engine=engine(fake_api))

    assert result == {"status": "completed", "video_id": video_id}
    assert video_row(video_id).status == VideoStatus.COMPLETED
    history = events(redis_client, video_id)
    assert [e["step"] for e in history if "step" in e][:3] == [1, 2, 2]
    assert history[-1]["type"] == "complete"
    numbers = stats(fake_api)
    assert numbers["creates"][prompt] == 1
    job_id = video_row(video_id).model_job_id
    assert numbers["references"][job_id].startswith("image/png:")


def test_a_500_on_create_is_retried_without_a_second_job(
    fake_api: str, account: Account, redis_client: redis.Redis
) -> None:
    prompt = f"[fake:500] a storm at sea {account.email}"
    video_id = new_video(account, prompt)
    sora = engine(fake_api)

    with pytest.raises(attempt.Retry):
        attempt.run(video_id, task_id="sora-2", retry_count=0, max_retries=3, engine=sora)
    assert video_row(video_id).status == VideoStatus.PENDING
    result = attempt.run(video_id, task_id="sora-2", retry_count=1, max_retries=3, engine=sora)

    assert result["status"] == "completed"
    numbers = stats(fake_api)
    assert (numbers["attempts"][prompt], numbers["creates"][prompt]) == (2, 1)
    (error,) = [e for e in events(redis_client, video_id) if e["type"] == "error"]
    assert error["is_retryable"] is True
    assert error["error_code"] == "server_error"


def test_a_create_that_times_out_is_found_not_repeated(fake_api: str, account: Account) -> None:
    """The create's answer never arrives (the job was made): the next attempt finds
    the job in the list instead of paying for a second one."""
    prompt = f"[fake:slow] a train in the night {account.email}"
    video_id = new_video(account, prompt)
    sora = engine(fake_api, timeout=1.0)

    with pytest.raises(attempt.Retry):
        attempt.run(video_id, task_id="sora-3", retry_count=0, max_retries=3, engine=sora)
    result = attempt.run(video_id, task_id="sora-3", retry_count=1, max_retries=3, engine=sora)

    assert result["status"] == "completed"
    numbers = stats(fake_api)
    assert (numbers["attempts"][prompt], numbers["creates"][prompt]) == (1, 1)


def test_a_content_policy_failure_is_final_and_refunded(
    fake_api: str, account: Account, redis_client: redis.Redis
) -> None:
    prompt = f"[fake:policy] something refused {account.email}"
    video_id = new_video(account, prompt)

    result = attempt.run(
        video_id, task_id="sora-4", retry_count=0, max_retries=3, engine=engine(fake_api)
    )

    assert result["status"] == "failed"
    video = video_row(video_id)
    assert video.status == VideoStatus.FAILED
    assert "moderation" in (video.error_message or "").lower()
    history = events(redis_client, video_id)
    assert history[-1]["type"] == "complete"
    assert history[-1]["status"] == "failed"
    with session_scope() as session:
        assert session.get(User, account.id).credits == 1000  # type: ignore[union-attr]


def test_unknown_job_and_bad_key_are_clear_errors(fake_api: str) -> None:
    from kinora.worker.engines.base import EngineError

    with pytest.raises(EngineError, match="not found") as missing:
        engine(fake_api).retrieve("video_does_not_exist")
    assert missing.value.retryable is False
    assert not isinstance(missing.value, PolicyRefusal)


def submitted_unanswered(video_id: int, **values: Any) -> None:
    """What a worker killed between the model's create and recording its answer leaves:
    the time of the create, no model job id."""
    with session_scope() as session:
        session.execute(
            update(Video)
            .where(Video.id == video_id)
            .values(model_submitted_at=utcnow() - timedelta(seconds=1), **values)
        )


def test_a_crashed_create_never_adopts_the_job_another_video_recorded(
    fake_api: str, account: Account
) -> None:
    """README, Faults, tenancy: two users, one prompt, one shared API key. The first user's
    create never reached the model (its worker died); the second user's job is made and
    recorded meanwhile. The first video's next attempt finds that job in the model's list
    and leaves it: it makes its own."""
    prompt = f"A red kite over the dunes {account.email}"
    mine = new_video(account, prompt)
    submitted_unanswered(mine)
    theirs = new_video(make_account(), prompt)
    sora = engine(fake_api)
    assert attempt.run(theirs, task_id="t-b", retry_count=0, max_retries=3, engine=sora)[
        "status"
    ] == "completed"  # fmt: skip

    assert attempt.run(mine, task_id="t-a", retry_count=1, max_retries=3, engine=sora)[
        "status"
    ] == "completed"  # fmt: skip
    assert video_row(mine).model_job_id != video_row(theirs).model_job_id
    assert stats(fake_api)["creates"][prompt] == 2


def test_a_crashed_create_in_doubt_makes_a_new_job_rather_than_someone_elses(
    fake_api: str, account: Account
) -> None:
    """The other user's create was answered but not yet recorded when the first video
    looks: one job in the list, two videos that may own it. In doubt, a new job."""
    prompt = f"A glass of water on a train table {account.email}"
    mine = new_video(account, prompt)
    submitted_unanswered(mine)
    theirs = new_video(make_account(), prompt)
    submitted_unanswered(theirs, status=VideoStatus.PROCESSING, claimed_by="elsewhere",
                         lease_expires_at=utcnow() + timedelta(minutes=5))  # fmt: skip
    sora = engine(fake_api)
    their_job = sora.create(prompt=prompt, seconds=4, size="720x1280")

    assert attempt.run(mine, task_id="t-c", retry_count=1, max_retries=3, engine=sora)[
        "status"
    ] == "completed"  # fmt: skip
    assert video_row(mine).model_job_id != their_job.id
    assert stats(fake_api)["creates"][prompt] == 2


def test_one_model_job_cannot_be_recorded_for_two_videos(account: Account) -> None:
    first, second = new_video(account, "one job, two videos"), new_video(account, "two videos")
    with session_scope() as session:
        session.execute(update(Video).where(Video.id == first).values(model_job_id="video_x1"))
    with pytest.raises(IntegrityError), session_scope() as session:
        session.execute(update(Video).where(Video.id == second).values(model_job_id="video_x1"))
