"""The fault rounds against a library host (docs/library.md, "A store"): the CSV
import example (examples/csv_import) with a store, as its README runs it: uvicorn
serving the app, a Celery worker running the task, each a real process, the events
on a Redis server of their own. Each round starts an import, follows it with two
EventSource-like clients, and breaks one thing mid-import:

  pause_redis    SIGSTOP of the events' Redis for 1-2 s
  restart_redis  SIGKILL of it, started again on its append-only file
  flush_redis    FLUSHALL of it
  kill_api       SIGKILL of the app, started again on the same port
  none           nothing

Then over everything each client saw (the same checks as Kinora's fault rounds): seqs
strictly increase, every gap announced by `history_lost`, each client reaches the
import's `complete` with the outcome the store has, no 500, no request unanswered."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from kinora.cli.embedded import EmbeddedRedis, free_port
from kinora.streaming import SQLStore, keys
from tests.faults.chaos import Watcher, seq_problems
from tests.utils.processes import stop, wait_for

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "csv_import"
FAULTS = ("pause_redis", "restart_redis", "flush_redis", "kill_api", "none")
ROWS = 40


@dataclass
class Host:
    root: Path
    env: dict[str, str]
    events: EmbeddedRedis
    port: int
    app: subprocess.Popen[bytes] | None = None
    worker: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def run(self, args: list[str], log: str) -> subprocess.Popen[bytes]:
        with (self.root / log).open("ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", *args], cwd=EXAMPLE, env=self.env, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def start_app(self) -> None:
        self.app = self.run(["uvicorn", "app:app", "--port", str(self.port)], "app.log")
        wait_for("the app", self.answers, 30)

    def answers(self) -> bool:
        try:
            return httpx.get(f"{self.base}/progress/kinora-progress.js", timeout=1).is_success
        except httpx.TransportError:
            return False


@pytest.fixture(scope="module")
def host(environment: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    root = tmp_path_factory.mktemp("library-host")
    events = EmbeddedRedis(root / "redis", port=free_port()).start()
    env = {
        **environment,
        "BROKER_URL": environment["REDIS_URL"],  # the queue stays on the session's Redis
        "REDIS_URL": events.url,  # the events on a Redis the rounds break
        "STORE_URL": f"sqlite:///{root / 'imports.db'}",
        "ROW_SECONDS": "0.06",
        "SSE_PING_SECONDS": "1",
        "SSE_RETRY_MS": "300",
    }
    found = Host(root, env, events, free_port())
    found.worker = found.run(
        [
            "celery",
            "-A",
            "tasks",
            "worker",
            "--pool",
            "solo",
            "-Q",
            "csv_import",
            "--loglevel",
            "INFO",
        ],
        "worker.log",
    )
    try:
        wait_for("the worker", lambda: b"ready." in (root / "worker.log").read_bytes(), 30)
        found.start_app()
        yield found
    finally:
        for process in (found.app, found.worker):
            if process is not None:
                stop(process)
        events.stop()


def inject(host: Host, fault: str, rng: random.Random) -> None:
    process = host.events.process
    assert process is not None
    if fault == "pause_redis":
        os.kill(process.pid, signal.SIGSTOP)
        time.sleep(rng.uniform(1, 2))
        os.kill(process.pid, signal.SIGCONT)
    elif fault == "restart_redis":
        process.kill()
        process.wait(10)
        host.events.start()
    elif fault == "flush_redis":
        redis.Redis.from_url(host.events.url, socket_timeout=5).flushall()
    elif fault == "kill_api":
        assert host.app is not None
        os.killpg(host.app.pid, signal.SIGKILL)
        host.app.wait(10)
        host.start_app()


def test_each_fault_breaks_no_promise_of_a_library_job(host: Host) -> None:
    rng = random.Random(7)
    csv = "email\n" + "".join(f"user{i}@example.com\n" for i in range(ROWS))
    store = SQLStore(host.env["STORE_URL"], create=False)
    violations: list[str] = []
    for number, fault in enumerate(FAULTS, 1):
        started = httpx.post(f"{host.base}/imports", content=csv, timeout=10)
        assert started.status_code == 202, started.text
        job = started.json()["job_id"]
        url = f"{host.base}/progress/{job}/stream"
        deadline = time.monotonic() + 60
        watchers = [Watcher(host.base, 0, "", deadline, url=url) for _ in range(2)]
        for watcher in watchers:
            watcher.start()
        time.sleep(rng.uniform(0.4, 1.5))  # mid-import (40 rows take about 2.4 s)
        inject(host, fault, rng)
        for watcher in watchers:
            watcher.join(max(1.0, deadline - time.monotonic()))
        record = store._load(keys.job(job))
        outcome = record.status if record is not None else None
        for i, watcher in enumerate(watchers):
            said = [*watcher.problems, *seq_problems(watcher.events)]
            if watcher.events and watcher.events[-1].get("status") != outcome:
                said.append(f"ended {watcher.events[-1].get('status')}, the store: {outcome}")
            violations += [f"round {number} ({fault}), client {i}: {p}" for p in said]
        assert outcome == "completed", f"round {number} ({fault}): the import {outcome}"
    store.engine.dispose()
    assert not violations, "\n".join(violations)
