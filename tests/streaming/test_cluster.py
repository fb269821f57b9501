"""A Redis Cluster (README, Redis topologies): each job's keys share its channel's hash
slot, its events travel on sharded pub/sub (SPUBLISH on the shard that owns the slot,
the hub SSUBSCRIBEd per shard), and a shard that fails over (its primary SIGKILLed,
its replica promoted) costs the streams on it a moment: each goes on, `seq` strictly
increasing, every gap announced, to the `complete`. Real `redis-server` processes
joined by `redis-cli --cluster create`, a library host under uvicorn."""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi import FastAPI

from kinora.cli.embedded import free_port
from kinora.streaming import ProgressCore, SSELogger, StreamSettings, keys, progress_router
from kinora.streaming.connect import topology
from tests.utils.clients import Follower, events_of, fresh_machine_env
from tests.utils.cluster import ClusterSet, plain_server
from tests.utils.processes import Up, wait_for
from tests.utils.servers import serve

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterSet]:
    found = ClusterSet(tmp_path_factory.mktemp("cluster"), shards=3, replicas=1).start()
    try:
        yield found
    finally:
        found.stop()


@pytest.fixture
def host(cluster: ClusterSet) -> Iterator[str]:
    app = FastAPI(title="not Kinora")
    settings = StreamSettings(redis_url=cluster.url, sse_retry_ms=200)
    router = progress_router(authorize=lambda request, job_id: True, core=ProgressCore(settings))
    app.include_router(router, prefix="/progress")
    with serve(app) as base:
        yield base


class Reader(threading.Thread):
    """One client of one job's stream, reconnecting with Last-Event-ID as EventSource
    does, until the `complete` (or its bound)."""

    def __init__(self, url: str, bound: float = 60) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.bound = bound
        self.events: list[dict[str, Any]] = []
        self.connections = 0
        self.open = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.bound
        with httpx.Client(timeout=httpx.Timeout(10, read=10)) as client:
            while time.monotonic() < deadline:
                headers = {"Last-Event-ID": self.events[-1]["id"]} if self.events else {}
                try:
                    with client.stream("GET", self.url, headers=headers) as response:
                        if response.status_code == 204:
                            return
                        if response.status_code != 200:
                            time.sleep(0.2)  # a 503 while the shard fails over
                            continue
                        self.connections += 1
                        self.open.set()
                        for line in response.iter_lines():
                            if line.startswith("data: "):
                                self.events.extend(events_of([line]))
                                if self.events[-1]["type"] == "complete":
                                    return
                except httpx.TransportError:
                    time.sleep(0.2)

    def check(self) -> None:
        """The stream's promises over everything this client saw."""
        seqs = [e["seq"] for e in self.events]
        assert seqs == sorted(set(seqs)), seqs  # strictly increasing: none repeats
        lost = {e["seq"] for e in self.events if e.get("code") == "history_lost"}
        for before, after in itertools.pairwise(seqs):
            assert after == before + 1 or after in lost, (before, after, seqs)
        assert self.events, "nothing received"
        assert self.events[-1]["type"] == "complete", self.events[-3:]


def test_events_travel_on_the_shard_that_owns_each_job(cluster: ClusterSet, host: str) -> None:
    where = topology(cluster.url)
    assert where.cluster
    # Four jobs on each of the three shards (twelve ids at random left one shard with
    # none about once in forty runs).
    owners: dict[str, int] = {}
    for i in range(1000):
        job = f"render-{time.monotonic_ns()}-{i}"
        owner = cluster.owner(keys.job(job).channel)
        if list(owners.values()).count(owner) < 4:
            owners[job] = owner
        if len(owners) == 12:
            break
    jobs = list(owners)
    assert len(jobs) == 12
    assert len(set(owners.values())) == 3  # the jobs are spread over all three shards
    for job in jobs:  # its keys in its channel's slot
        key = keys.job(job)
        assert {cluster.owner(k) for k in (key.seq, key.history, key.end, key.sent)} == {
            owners[job]
        }
    readers = {job: Reader(f"{host}/progress/{job}/stream") for job in jobs}
    for reader in readers.values():
        reader.start()
    for reader in readers.values():
        assert reader.open.wait(10)

    # Each shard's primary carries the subscriptions of its own jobs only, on sharded
    # channels (the hub subscribes once a stream's head is out: waited for); no classic
    # subscription anywhere.
    def subscribed(job: str, port: int, command: str) -> int:
        with redis.Redis(port=port, socket_timeout=2) as node:
            found = dict(node.execute_command(command, keys.job(job).channel))
        return int(next(iter(found.values())))

    for job, port in owners.items():
        wait_for(
            f"{job}'s sharded subscription",
            lambda j=job, p=port: subscribed(j, p, "PUBSUB SHARDNUMSUB") == 1,
            timeout=10,
        )
        assert subscribed(job, port, "PUBSUB NUMSUB") == 0, job
    loggers = {job: SSELogger(job, kind="job", redis_url=cluster.url) for job in jobs}
    for step in range(1, 21):
        for job in jobs:
            assert loggers[job].update(step, 20, f"part {step}") == step
    for job in jobs:
        loggers[job].complete(rows=20)
    for reader in readers.values():
        reader.join(20)
        reader.check()
        assert [e["seq"] for e in reader.events] == list(range(1, 22))
        assert reader.connections == 1


def test_a_shard_that_fails_over_costs_its_streams_a_moment(cluster: ClusterSet, host: str) -> None:
    jobs = [f"render-{time.monotonic_ns()}-{i}" for i in range(6)]
    readers = {job: Reader(f"{host}/progress/{job}/stream") for job in jobs}
    loggers = {job: SSELogger(job, kind="job", redis_url=cluster.url) for job in jobs}
    for reader in readers.values():
        reader.start()
    for reader in readers.values():
        assert reader.open.wait(10)
    for step in range(1, 6):
        for job in jobs:
            loggers[job].update(step, 20)
    victim = cluster.owner(keys.job(jobs[0]).channel)
    on_victim = [job for job in jobs if cluster.owner(keys.job(job).channel) == victim]
    took = cluster.fail_over(victim)
    # The jobs go on publishing (what their shard could not take waits in the
    # logger's outbox and goes out once the replica is the primary).
    for step in range(6, 21):
        for job in jobs:
            loggers[job].update(step, 20)
        time.sleep(0.05)
    for job in jobs:
        loggers[job].complete()
    for job, reader in readers.items():
        reader.join(30)
        reader.check()
        if job not in on_victim:  # the other shards' streams never noticed
            assert reader.connections == 1, job
    assert took < 15, took


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[str]:
    """A Redis server of the test's own for Celery's queue (a video handed back at the
    end must not wait in a queue another test's worker reads)."""
    with plain_server(tmp_path) as (url, _):
        yield url


def test_kinora_on_a_cluster_with_its_queue_on_another_redis(
    cluster: ClusterSet, tmp_path: Path, broker: str
) -> None:
    """`kinora up` with REDIS_URL a cluster and BROKER_URL a Redis server: videos run
    and their streams end with the outcome; without BROKER_URL it refuses to start,
    saying what to set."""
    refused = subprocess.run(
        [sys.executable, "-m", "kinora", "api"], cwd=tmp_path, capture_output=True, text=True,
        env=fresh_machine_env(REDIS_URL=cluster.url), timeout=30,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "set BROKER_URL" in refused.stderr, refused.stderr
    env = fresh_machine_env(
        REDIS_URL=cluster.url, BROKER_URL=broker, MOCK_STEP_SECONDS="0.3", SSE_RETRY_MS="300",
        VIDEO_TIMEOUT_SECONDS="120",
    )  # fmt: skip
    up = Up(tmp_path, free_port(), env)
    base = up.base
    try:
        token = up.token()
        headers = {"Authorization": f"Bearer {token}"}
        followers = []
        for prompt in ("A lighthouse at dusk", "A kite over a beach", "Rain on a window"):
            created = httpx.post(
                f"{base}/api/v1/videos/generate", headers=headers, timeout=10,
                json={"prompt": prompt},
            )  # fmt: skip
            assert created.status_code == 202, created.text
            follower = Follower([base], created.json()["video_id"], token)
            follower.start()
            followers.append(follower)
        for follower in followers:
            follower.join(60)
            assert not follower.is_alive(), up.text()[-3000:]
            assert follower.error is None, follower.error
            assert [e["seq"] for e in follower.events] == list(range(1, len(follower.events) + 1))
            assert follower.events[-1]["status"] == "completed", follower.events[-1]["message"]
    finally:
        up.stop(check=False)
