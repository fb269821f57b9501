"""`kinora up` through the faults of a service's life (README, Faults): a Ctrl-C and a
start again on the same ./var (stopped then by a closed terminal's SIGHUP), and a
SIGKILL of each of its parts (the API, the embedded Redis, a worker's pool process)
while videos run, then of `kinora up` itself. Nothing queued or running is lost,
nothing is paid twice, a watcher resumes exactly where it stopped, a second `kinora up`
on the same var dir is refused, and no child outlives `kinora up`."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from kinora.cli.embedded import free_port
from tests.utils.clients import Follower, fresh_machine_env
from tests.utils.processes import Up, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PROMPT = "A hot air balloon rising over a valley at dawn"


def up_env() -> dict[str, str]:
    # Long enough to stop mid-job, short leases so a killed worker's video moves on.
    return fresh_machine_env(MOCK_STEP_SECONDS="0.6", LEASE_SECONDS="3", SWEEP_INTERVAL_SECONDS="1")


def sql(cwd: Path, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(cwd / "var" / "kinora.db") as db:
        return db.execute(query, params).fetchall()


def video_state(base: str, token: str, video: int) -> dict[str, Any]:
    response = httpx.get(
        f"{base}/api/v1/videos/{video}", headers={"Authorization": f"Bearer {token}"}, timeout=5
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def seen(up: Up, token: str, video: int) -> str:
    """What a wait for a video to complete saw when it gave up: the video's state, its
    last events, and which of the stack's processes still run."""
    try:
        state = video_state(up.base, token, video)
    except (httpx.HTTPError, AssertionError) as exc:
        return f"video {video}: unknown (the API: {exc!r}); up alive: {up.process.poll() is None}"
    said = [f"{e['seq']}:{e['message']}" for e in state["logs"][-5:]]
    parts = [" ".join(p.cmdline()[2:4]) for p in psutil.Process(up.process.pid).children()]
    return (
        f"video {video} to complete: it is {state['status']} at {state['progress']}% "
        f"(error: {state['error_message']}); "
        f"last events {said}; kinora up's children {parts}"
    )


def wait_running(base: str, token: str, video: int) -> None:
    """Until the video's model job runs (step 4, progress 15)."""
    wait_for(
        f"video {video}'s model job to run",
        lambda: video_state(base, token, video)["progress"] >= 15,
        timeout=60,
    )


def submit(base: str, token: str, prompt: str) -> int:
    response = httpx.post(
        f"{base}/api/v1/videos/generate",
        json={"prompt": prompt},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert response.status_code == 202, response.text
    video: int = response.json()["video_id"]
    return video


def assert_gapless_to_completed(follower: Follower) -> None:
    assert follower.error is None, follower.error
    assert not follower.is_alive(), follower.events
    seqs = [e["seq"] for e in follower.events]
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    assert [e["type"] for e in follower.events].count("complete") == 1
    assert follower.events[-1]["status"] == "completed"


def test_a_restart_on_the_same_var_loses_nothing_and_pays_nothing_twice(tmp_path: Path) -> None:
    port = free_port()
    first = Up(tmp_path, port, up_env())
    try:
        token = first.token()
        running = submit(first.base, token, PROMPT)
        queued = submit(first.base, token, PROMPT + ", second take")  # one worker: it waits
        watcher = Follower([first.base], running, token)
        watcher.start()
        wait_running(first.base, token, running)
        model_job = sql(tmp_path, "SELECT model_job_id FROM videos WHERE id = ?", running)[0][0]
        assert model_job
    finally:
        first.stop()  # Ctrl-C: the running video goes back to the queue
    assert sql(tmp_path, "SELECT status FROM videos WHERE id IN (?, ?)", running, queued) == [
        ("pending",),
        ("pending",),
    ]

    again = Up(tmp_path, port, up_env())  # the same port: the watcher reconnects by itself
    try:
        assert again.token() == token
        started = time.monotonic()
        wait_for(
            "the queued video to start after the restart",
            lambda: video_state(again.base, token, queued)["status"] != "pending",
            timeout=60,
        )
        queued_start = time.monotonic() - started
        for video in (running, queued):
            try:
                wait_for(
                    partial(seen, again, token, video),
                    lambda v=video: video_state(again.base, token, v)["status"] == "completed",
                    timeout=90,
                )
            except BaseException:
                print(first.text()[-4000:], "\n-- after the restart --\n", again.text()[-8000:])
                raise
        watcher.join(30)
        assert_gapless_to_completed(watcher)
        assert any("Resuming model job" in e["message"] for e in watcher.events)
        # The same model job, one per video: nothing paid twice.
        assert sql(tmp_path, "SELECT model_job_id FROM videos WHERE id = ?", running) == [
            (model_job,)
        ]
        assert int(again.redis().get("mock:creates") or 0) == 2
        assert sql(tmp_path, "SELECT kind, count(*) FROM credit_entries GROUP BY kind") == [
            ("charge", 2),
            ("grant", 1),
        ]
        print(f"restart -> queued video started in {queued_start:.1f} s")
        # A closed terminal (SIGHUP) stops the stack cleanly, leaving no child behind.
        family = psutil.Process(again.process.pid).children(recursive=True)
        again.stop(signal.SIGHUP)  # exit code 0 within 15 s, or it fails
        _, alive = psutil.wait_procs(family, timeout=10)
        assert alive == [], [p.cmdline() for p in alive]
    finally:
        again.stop()


def test_every_part_killed_is_started_again_and_the_video_goes_on(tmp_path: Path) -> None:
    up = Up(tmp_path, free_port(), up_env())
    try:
        token = up.token()
        # The API, SIGKILLed: started again, and says so.
        up.child("api").kill()
        wait_for("the API to be back", lambda: "kinora api started again" in up.text(), 30)
        assert "kinora api exited with code -9; starting it again" in up.text()
        wait_for("the API to answer", lambda: _healthy(up.base), 30)

        # The embedded Redis, SIGKILLed: started again on the same port with its data.
        up.redis().set("survives", "yes")
        time.sleep(1.5)  # appendfsync everysec: what is a second old is on disk
        up.child("redis-server").kill()
        wait_for("Redis to be back", lambda: "the embedded Redis started again" in up.text(), 30)
        assert up.redis().get("survives") == b"yes"

        # A worker's pool process, SIGKILLed mid-video: Celery hands the message back at
        # once; it waits out the dead claim and resumes the same model job.
        video = submit(up.base, token, PROMPT)
        watcher = Follower([up.base], video, token)
        watcher.start()
        wait_running(up.base, token, video)
        pool = up.child("worker --concurrency").children()
        assert pool
        for process in pool:
            process.kill()
        killed = time.monotonic()
        wait_for(
            "the video to complete",
            lambda: video_state(up.base, token, video)["status"] == "completed",
            timeout=60,
        )
        watcher.join(30)
        assert_gapless_to_completed(watcher)
        assert sql(tmp_path, "SELECT attempts FROM videos WHERE id = ?", video) == [(2,)]
        assert int(up.redis().get("mock:creates") or 0) == 1
        print(f"worker pool killed -> video completed {time.monotonic() - killed:.1f} s later")

        # A second `kinora up` on the same var dir refuses to start, naming the first.
        second = subprocess.run(
            [sys.executable, "-m", "kinora", "up", "--port", str(free_port())],
            cwd=tmp_path, env=up_env(), capture_output=True, text=True, timeout=60,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert second.returncode == 1, second.stdout + second.stderr
        assert f"another kinora up (pid {up.process.pid})" in second.stderr

        # `kinora up` itself, SIGKILLed: its API, workers and embedded Redis go with it
        # (each runs in a session of its own, out of reach of a group kill).
        family = psutil.Process(up.process.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in family)
        assert all(part in names for part in ("redis-server", "api", "worker", "--webhooks"))
        up.process.kill()
        _, alive = psutil.wait_procs(family, timeout=20)
        assert alive == [], [p.cmdline() for p in alive]
    finally:
        up.stop()


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False
