"""Kinora as it runs on many machines, on one: PostgreSQL, one Redis, two API
processes on two ports, and separate worker processes, each started as a deployment
starts them (`kinora db upgrade`, `kinora api`, `kinora worker`). Processes are
killed and stopped mid-run; no video is lost, generated twice or charged twice, and
every watcher, reconnecting to whichever API is left, gets every event once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
import pytest
import redis

from kinora.cli.embedded import EmbeddedRedis, free_port
from tests.utils.clients import Follower
from tests.utils.postgres import ThrowawayPostgres
from tests.utils.processes import kinora, stop, wait_for
from tests.utils.settings import FAST

pytestmark = pytest.mark.slow


@dataclass
class Cluster:
    env: dict[str, str]
    logs: Path
    database: str  # a psycopg URL
    redis: redis.Redis
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, *args: str, **settings: str) -> subprocess.Popen[bytes]:
        process = kinora(*args, env=self.env | settings, log=self.logs / f"{name}.log")
        self.processes[name] = process
        return process

    def api(self, name: str) -> str:
        port = free_port()
        process = self.start(name, "api", "--port", str(port))
        base = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert process.poll() is None, (self.logs / f"{name}.log").read_text()
            try:
                return httpx.get(f"{base}/readyz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(f"API {name}", up, timeout=30)
        return base

    def worker(self, name: str, **settings: str) -> subprocess.Popen[bytes]:
        process = self.start(name, "worker", "--concurrency", "2", **settings)
        wait_for(
            f"worker {name}",
            lambda: "ready." in (self.logs / f"{name}.log").read_text(),
            timeout=30,
        )
        return process

    def stop_workers(self) -> None:
        for name in [n for n in self.processes if n.startswith("worker")]:
            stop(self.processes.pop(name), timeout=30)

    def watched_video(self, api: str, token: str, prompt: str) -> tuple[int, Follower]:
        """A video submitted through `api`, and a watcher of it already reading."""
        created = httpx.post(
            f"{api}/api/v1/videos/generate",
            json={"prompt": prompt},
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        ).json()
        follower = Follower([api], created["video_id"], token)
        follower.start()
        return created["video_id"], follower

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.database) as conn:
            return conn.execute(query, params).fetchall()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("cluster")
    logs = base / "logs"
    logs.mkdir()
    postgres = ThrowawayPostgres().start()
    try:
        with EmbeddedRedis(base / "redis", persist=False) as server:
            env = {
                k: v
                for k, v in os.environ.items()
                if k not in ("REDIS_URL", "DATABASE_URL", "PROMETHEUS_MULTIPROC_DIR")
            }
            env.update(FAST)
            env.update(
                KINORA_VAR_DIR=str(base / "var"),
                STORAGE_DIR=str(base / "videos"),  # the volume every process shares
                REDIS_URL=server.url,
                DATABASE_URL=postgres.url,
                LOG_FORMAT="json",
                MOCK_STEP_SECONDS="0.5",
                VIDEO_TIMEOUT_SECONDS="120",
                GENERATE_RATE_LIMIT="0",
            )
            subprocess.run(
                [sys.executable, "-m", "kinora", "db", "upgrade"], env=env, check=True, timeout=60
            )
            client = redis.Redis.from_url(server.url)
            running = Cluster(env, logs, postgres.url.replace("+psycopg", ""), client)
            try:
                yield running
            finally:
                for process in running.processes.values():
                    stop(process)
                client.close()
    finally:
        postgres.stop()


def new_user(cluster: Cluster, email: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "kinora", "users", "create", email, "--credits", "5000"],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.timeout(240)
def test_videos_survive_a_killed_worker_and_a_killed_api(cluster: Cluster) -> None:
    submit_api, watch_api = cluster.api("api-1"), cluster.api("api-2")
    doomed_worker = cluster.worker("worker-1")
    cluster.worker("worker-2")
    token = new_user(cluster, "scale@test.kinora")
    headers = {"Authorization": f"Bearer {token}"}

    videos = []
    for n in range(6):
        response = httpx.post(
            f"{submit_api}/api/v1/videos/generate",
            json={"prompt": f"A lantern festival over a river, take {n}"},
            headers=headers,
            timeout=10,
        )
        assert response.status_code == 202, response.text
        videos.append(response.json()["video_id"])
    # Watched through the other API; when it dies, through the one that is left.
    followers = [Follower([watch_api, submit_api], video, token) for video in videos]
    for follower in followers:
        follower.start()
    wait_for("every watcher's first event", lambda: all(f.events for f in followers), timeout=30)

    pool = {str(p.pid) for p in psutil.Process(doomed_worker.pid).children(recursive=True)}

    def held_by_doomed_worker() -> set[int]:
        rows = cluster.sql("SELECT id, claimed_by FROM videos WHERE status = 'processing'")
        return {video for video, owner in rows if owner and owner.split(":")[1] in pool}

    wait_for("worker-1 to be generating", lambda: bool(held_by_doomed_worker()), timeout=30)
    orphaned = held_by_doomed_worker()
    # A crash of a worker (its pool processes too) and of an API process.
    os.killpg(doomed_worker.pid, signal.SIGKILL)
    cluster.processes["api-2"].kill()
    for follower in followers:
        follower.join(60)

    for follower in followers:
        assert follower.error is None, follower.error
        assert not follower.is_alive(), (follower.video_id, follower.connections, follower.events)
        seqs = [e["seq"] for e in follower.events]
        assert seqs == list(range(1, len(seqs) + 1)), f"video {follower.video_id}: {seqs}"
        assert [e["type"] for e in follower.events].count("complete") == 1
        assert follower.events[-1]["status"] == "completed"
    # Every client was watching through api-2, and came back through api-1.
    assert all(f.connections[0] == watch_api for f in followers)
    assert all(f.connections[-1] == submit_api for f in followers)

    # The videos the dead worker held were taken over, and resumed, not paid again.
    taken_over = cluster.sql("SELECT id FROM videos WHERE attempts > 1")
    assert orphaned <= {video for (video,) in taken_over}
    statuses = cluster.sql("SELECT status, count(*) FROM videos GROUP BY status")
    assert statuses == [("completed", 6)]
    charges = cluster.sql("SELECT count(*), sum(amount) FROM credit_entries WHERE kind = 'charge'")
    assert charges == [(6, -600)]
    assert cluster.sql("SELECT count(*) FROM credit_entries WHERE kind = 'refund'") == [(0,)]
    assert int(cluster.redis.get("mock:creates") or 0) == 6  # no model job paid twice

    # Every line Kinora logged for a job is JSON with its video id and trace id.
    lines = [
        json.loads(line)
        for name in ("worker-1", "worker-2")
        for line in (cluster.logs / f"{name}.log").read_text().splitlines()
        if line.startswith("{")
    ]
    job_lines = [line for line in lines if line["video_id"] is not None]
    assert {line["video_id"] for line in job_lines} == set(videos)
    assert all(line["trace_id"] for line in job_lines)
    # Celery's own line for each task run is among them.
    celery_lines = [line for line in job_lines if line["logger"] == "celery.app.trace"]
    assert {line["video_id"] for line in celery_lines} == set(videos)


@pytest.mark.timeout(180)
def test_a_stopping_worker_hands_its_video_back_at_once(cluster: Cluster) -> None:
    cluster.stop_workers()
    api = cluster.api("api-3")
    leaving = cluster.worker("worker-3")
    token = new_user(cluster, "handback@test.kinora")
    video_id, follower = cluster.watched_video(api, token, "A tram climbing a hill in the rain")

    def model_job() -> str | None:
        value: str | None = cluster.sql("SELECT model_job_id FROM videos WHERE id = %s", video_id)[
            0
        ][0]
        return value

    wait_for("the model job", lambda: model_job() is not None, timeout=30)
    job = model_job()
    creates = int(cluster.redis.get("mock:creates") or 0)
    signalled = time.monotonic()
    leaving.send_signal(signal.SIGTERM)
    leaving.wait(15)
    assert time.monotonic() - signalled < 10  # it did not wait for the video to finish
    assert cluster.sql("SELECT status, model_job_id FROM videos WHERE id = %s", video_id) == [
        ("pending", job)
    ]

    cluster.worker("worker-4")
    follower.join(60)
    assert not follower.is_alive()
    messages = [e["message"] for e in follower.events]
    assert any("goes back to the queue" in m for m in messages), messages
    assert any(f"Resuming model job {job}" in m for m in messages), messages
    assert follower.events[-1]["status"] == "completed"
    assert [e["seq"] for e in follower.events] == list(range(1, len(follower.events) + 1))
    assert int(cluster.redis.get("mock:creates") or 0) == creates  # the same job resumed


@pytest.mark.timeout(180)
def test_a_message_that_died_with_its_worker_is_queued_again_within_seconds(
    cluster: Cluster,
) -> None:
    """A worker holds a message it has not started yet (here a retry's, waiting out its
    countdown) unacknowledged: killed then, the broker would give the message back
    only after its visibility timeout, over ten minutes. The video is queued again once
    the dead worker's hold runs out, and finishes in seconds, paid once."""
    cluster.stop_workers()
    api = cluster.api("api-4")
    slow_retry = {"RETRY_COUNTDOWN_SECONDS": "60"}
    workers = [cluster.worker(name, **slow_retry) for name in ("worker-5", "worker-6")]
    token = new_user(cluster, "held@test.kinora")
    # The first create fails (transient): the retry's message waits 60 s.
    prompt = "[mock:transient] A paper boat on a flooded street"
    video_id, follower = cluster.watched_video(api, token, prompt)

    def holder() -> str | None:
        [(status, attempts, owner)] = cluster.sql(
            "SELECT status, attempts, claimed_by FROM videos WHERE id = %s", video_id
        )
        held = status == "pending" and attempts == 1 and (owner or "").endswith(":held")
        return owner if held else None

    wait_for("a worker to hold the retry's message", lambda: holder() is not None, timeout=30)
    pid = int(str(holder()).split(":")[1])
    [doomed] = [w for w in workers if pid in {w.pid, *(c.pid for c in family(w))}]
    os.killpg(doomed.pid, signal.SIGKILL)
    killed = time.monotonic()
    follower.join(45)

    assert not follower.is_alive(), [e["message"] for e in follower.events]
    assert follower.error is None, follower.error
    assert time.monotonic() - killed < 45  # not the countdown, nor the visibility timeout
    events = follower.events
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [e["type"] for e in events].count("complete") == 1
    assert events[-1]["status"] == "completed"
    assert any("stopped answering" in e["message"] for e in events)
    assert cluster.sql(
        "SELECT kind, count(*) FROM credit_entries WHERE video_id = %s GROUP BY kind", video_id
    ) == [("charge", 1)]


def family(process: subprocess.Popen[bytes]) -> list[psutil.Process]:
    return psutil.Process(process.pid).children(recursive=True)
