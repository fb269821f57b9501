"""Kinora on a Redis that fails over (README, Deployment: Redis topologies): `kinora up`
with `REDIS_URL=redis+sentinel://…/kinora` (its API, worker and their Celery broker all
on the Sentinels' primary) while a video runs and a client follows it; the primary is
SIGKILLed and a replica promoted. The video completes, charged once; the client's seqs
never go backwards, each gap announced by `history_lost`; the stream ends with the
outcome the database has. Real processes: Debian's redis-server and redis-sentinel."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx
import pytest

from kinora.cli.embedded import free_port
from tests.faults.chaos import seq_problems
from tests.utils.clients import Follower, fresh_machine_env
from tests.utils.processes import Up, wait_for
from tests.utils.sentinel import SentinelSet

pytestmark = pytest.mark.slow


def test_a_video_goes_on_through_a_failover_charged_once(tmp_path: Path) -> None:
    sentinel = SentinelSet(tmp_path / "redis").start()
    # The mock model keeps its jobs in Redis: a call of it during the failover fails,
    # and the task is retried (RETRY_COUNTDOWN_SECONDS); a retry whose message the
    # broker could not take then is queued again by the sweeper (STALE_PENDING_SECONDS).
    env = fresh_machine_env(
        REDIS_URL=sentinel.url, MOCK_STEP_SECONDS="0.6", LEASE_SECONDS="3",
        SWEEP_INTERVAL_SECONDS="1", SSE_RETRY_MS="300", SSE_PING_SECONDS="1",
        RETRY_COUNTDOWN_SECONDS="1", STALE_PENDING_SECONDS="5",
    )  # fmt: skip
    up = Up(tmp_path, free_port(), env)
    base = up.base
    try:
        token = up.token()
        headers = {"Authorization": f"Bearer {token}"}
        created = httpx.post(
            f"{base}/api/v1/videos/generate", headers=headers, timeout=10,
            json={"prompt": "A lighthouse beam sweeping over a night sea"},
        )  # fmt: skip
        assert created.status_code == 202, created.text
        video = created.json()["video_id"]
        follower = Follower([base], video, token)
        follower.start()

        def running() -> bool:
            state = httpx.get(f"{base}/api/v1/videos/{video}", headers=headers, timeout=5)
            return bool(state.json()["progress"] >= 15)

        wait_for("the model job to run", running, timeout=60)
        took = sentinel.fail_over()
        print(f"the Sentinels named a new primary {took:.1f} s after the SIGKILL")
        follower.join(120)
        assert not follower.is_alive(), up.text()[-3000:]
        assert follower.error is None, follower.error
        assert not seq_problems(follower.events), [e["seq"] for e in follower.events]
        assert follower.events[-1]["status"] == "completed"
        with sqlite3.connect(tmp_path / "var" / "kinora.db") as db:
            assert db.execute("SELECT status FROM videos WHERE id = ?", (video,)).fetchall() == [
                ("completed",)
            ]
            charges = db.execute("SELECT kind, count(*) FROM credit_entries GROUP BY kind")
            assert dict(charges.fetchall()) == {"charge": 1, "grant": 1}
    finally:
        up.stop(check=False)
        sentinel.stop()
