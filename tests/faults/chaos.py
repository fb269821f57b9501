"""Fault injection against real processes (README, Faults), in rounds.

A cluster of real parts runs for the whole run: a Redis server (append-only file),
SQLite, one API under uvicorn and two Celery workers. Each round submits a few videos
(one of them three times at once with one Idempotency-Key, sometimes one that fails
once with a transient error), watches each with two EventSource-like clients, cancels
one now and then, and breaks one thing at a random moment:

  kill_pool      SIGKILL of a worker's pool process (Celery hands the message back)
  kill_worker    SIGKILL of a whole worker, started again a second later
  kill_api       SIGKILL of the API, started again on the same port
  pause_redis    SIGSTOP of Redis for 1-3 s
  restart_redis  SIGKILL of Redis, started again on its data
  flush_redis    FLUSHALL: every event, counter, queued message and mock job gone
  redeliver      the running video's task sent again (a duplicate delivery)
  none           nothing

With `--sentinel` the cluster's Redis is a primary, a replica and three Sentinels
(REDIS_URL=redis+sentinel://…), and the faults are those of the processes and

  failover       SIGKILL of the primary: the Sentinels promote the replica; the killed
                 server comes back as the new primary's replica

Then it waits for every video to end and checks, over everything every client saw:
each video ends exactly once, as the database says; one charge, a refund exactly when
it did not complete; the ledger sums to the balance; at most one paid model job per
video; each watcher's seqs strictly increase, every gap announced by `history_lost`;
each watcher reaches the outcome; no 500; no request unanswered for 10 s.

A process that exits by itself is started again, as `kinora up` and compose's
`restart: unless-stopped` do, and counted as a crash restart (Celery 5.7's worker
exits when its broker connection breaks while it holds an unacknowledged message).

    python -m tests.faults.chaos --rounds 200 [--seed N] [--sentinel]     (make faults)

prints one line per round and a table; tests/faults/test_chaos.py runs a few rounds.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis
from celery import Celery

from kinora.cli.embedded import EmbeddedRedis, free_port
from kinora.streaming import connect
from kinora.worker.engines.mock import prompt_digest
from tests.utils.sentinel import SentinelSet
from tests.utils.settings import reset_caches

FAULTS = (
    "kill_pool",
    "kill_worker",
    "kill_api",
    "pause_redis",
    "restart_redis",
    "flush_redis",
    "redeliver",
    "none",
)
# A Redis that fails over: what breaks is the primary, and the processes as above.
SENTINEL_FAULTS = ("failover", "kill_pool", "kill_worker", "kill_api", "redeliver", "none")
TERMINAL = {"completed", "failed", "cancelled"}
ANSWER_SECONDS = 10.0  # no request may go unanswered longer (README, Faults)

SETTINGS = {
    "MOCK_STEP_SECONDS": "0.25",
    "SSE_PING_SECONDS": "1",
    "SSE_RETRY_MS": "300",
    "LEASE_SECONDS": "3",
    "SWEEP_INTERVAL_SECONDS": "1",
    "STALE_PENDING_SECONDS": "8",
    "RETRY_COUNTDOWN_SECONDS": "1",
    "VIDEO_TIMEOUT_SECONDS": "90",
    "GENERATE_RATE_LIMIT": "0",
    "SECRET_KEY": "chaos-secret",
    "PYTHONUNBUFFERED": "1",
}


class Cluster:
    """Redis, SQLite, one API and two workers, each a real process that can be killed
    and started again on the same state."""

    def __init__(
        self, root: Path, settings: dict[str, str] | None = None, *, sentinel: bool = False
    ) -> None:
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True)
        self.sentinels = SentinelSet(root / "redis").start() if sentinel else None
        self.redis = None if sentinel else EmbeddedRedis(root / "redis", port=free_port()).start()
        self.redis_url = self.sentinels.url if self.sentinels else self.server().url
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("PROMETHEUS")},
            **(SETTINGS if settings is None else settings),
            "REDIS_URL": self.redis_url,
            "DATABASE_URL": f"sqlite:///{root / 'kinora.db'}",
            "KINORA_VAR_DIR": str(root / "var"),
            "PROMETHEUS_MULTIPROC_DIR": str(root / "metrics"),
        }
        (root / "metrics").mkdir()
        # The harness's own calls (users) go to this cluster's database; the caller's
        # environment comes back at stop().
        self._saved_environ = dict(os.environ)
        os.environ.update(self.env)
        reset_caches()
        subprocess.run(
            [sys.executable, "-m", "kinora", "db", "upgrade"],
            env=self.env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.commands = {
            "api": ["api", "--port", str(self.port)],
            "worker-1": ["worker", "--concurrency", "2"],
            "worker-2": ["worker", "--concurrency", "2"],
        }
        # A process that exits by itself is started again, as `kinora up`, compose's
        # `restart: unless-stopped` or systemd would; each such restart is counted.
        self.lock = threading.RLock()
        self.down: set[str] = set()  # stopped on purpose: not started again by itself
        self.crashes: list[str] = []
        self._stopping = threading.Event()
        for name in self.commands:
            self.start(name)
        self.wait_api()
        threading.Thread(target=self._supervise, daemon=True, name="chaos-supervisor").start()

    def _supervise(self) -> None:
        while not self._stopping.wait(0.5):
            with self.lock:
                for name, process in self.processes.items():
                    if name in self.down:
                        continue
                    if process.poll() is not None and not self._stopping.is_set():
                        self.crashes.append(f"{name} exited with {process.returncode}")
                        self.start(name)

    def start(self, name: str) -> None:
        """Start `name`, unless a copy of it runs already: never two (a copy nobody
        holds would outlive the cluster)."""
        with self.lock:
            self.down.discard(name)
            running = self.processes.get(name)
            if running is not None and running.poll() is None:
                return
            self._spawn(name)

    def _spawn(self, name: str) -> None:
        with (self.logs / f"{name}.log").open("ab") as out:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", "kinora", *self.commands[name]],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def restart(self, name: str, pause: float = 0.0) -> None:
        """SIGKILL, then start again (a fault, not a crash: not counted)."""
        with self.lock:
            self.kill(name)
            time.sleep(pause)
            self.start(name)

    def kill(self, name: str, *, stay_down: bool = False) -> None:
        """SIGKILL `name`'s process group; with `stay_down`, it is not started again
        until `start(name)`."""
        if stay_down:
            self.down.add(name)
        process = self.processes[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)

    def wait_api(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the API did not come up")

    def server(self) -> EmbeddedRedis:
        """The one Redis server (not a Sentinel cluster's)."""
        assert self.redis is not None, "this cluster's Redis fails over"
        return self.redis

    def redis_client(self) -> redis.Redis:
        return connect.sync_redis(self.redis_url)

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.root / "kinora.db", timeout=30) as db:
            return db.execute(query, params).fetchall()

    def model_jobs(self) -> collections.Counter[str]:
        """Paid model jobs per prompt digest, from the workers' logs."""
        found: collections.Counter[str] = collections.Counter()
        for name in ("worker-1", "worker-2"):
            text = (self.logs / f"{name}.log").read_text(errors="replace")
            found.update(re.findall(r"mock model job \S+ created for prompt (\w+)", text))
        return found

    def stop(self) -> None:
        self._stopping.set()
        with self.lock:
            self._stop_all()

    def _stop_all(self) -> None:
        for name in self.processes:
            process = self.processes[name]
            if process.poll() is None:
                process.terminate()
        for name in self.processes:
            try:
                self.processes[name].wait(10)
            except subprocess.TimeoutExpired:
                self.kill(name)
        if self.redis is not None:
            self.redis.stop()
        if self.sentinels is not None:
            self.sentinels.stop()
        os.environ.clear()
        os.environ.update(self._saved_environ)
        reset_caches()


class Watcher(threading.Thread):
    """An EventSource: reconnects with Last-Event-ID after any drop, waits after a 503,
    stops at `complete` or a 204; records everything it saw."""

    def __init__(
        self, base: str, video_id: int, token: str, deadline: float, *, url: str | None = None
    ) -> None:
        super().__init__(daemon=True)
        self.base = base
        # A video's stream, unless told another (a library host's job: no token).
        self.url = url or f"{base}/api/v1/videos/{video_id}/stream"
        self.video_id = video_id
        self.token = token
        self.deadline = deadline
        self.events: list[dict[str, Any]] = []
        self.problems: list[str] = []
        self.connects = 0

    def run(self) -> None:
        last_id: str | None = None
        while time.monotonic() < self.deadline:
            if self.events and self.events[-1]["type"] == "complete":
                return
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            if last_id is not None:
                headers["Last-Event-ID"] = last_id
            url = self.url
            started = time.monotonic()
            try:
                with (
                    httpx.Client(timeout=httpx.Timeout(ANSWER_SECONDS)) as client,
                    client.stream("GET", url, headers=headers) as response,
                ):
                    self.connects += 1
                    if response.status_code == 204:
                        self.problems.append(f"204 before complete after {last_id}")
                        return
                    if response.status_code == 503:
                        time.sleep(0.3)
                        continue
                    if response.status_code != 200:
                        self.problems.append(f"stream answered {response.status_code}")
                        time.sleep(0.3)
                        continue
                    for line in response.iter_lines():
                        if line.startswith("data: "):
                            event = json.loads(line[6:])
                            self.events.append(event)
                            last_id = event["id"]
            except httpx.TimeoutException:
                self.problems.append(
                    f"stream silent for {ANSWER_SECONDS:g} s "
                    f"(connected {time.monotonic() - started:.1f} s before)"
                )
            except httpx.TransportError:
                time.sleep(0.2)  # the API is down: it comes back
        self.problems.append("no complete before the deadline")


@dataclass
class Round:
    number: int
    fault: str
    videos: list[int] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    events: int = 0
    recovery: float | None = None  # fault over → the next event of a live video
    crashes: list[str] = field(default_factory=list)  # processes that exited by themselves
    seconds: float = 0.0


def submit(base: str, token: str, prompt: str, key: str, problems: list[str]) -> int | None:
    """POST with an Idempotency-Key, retried on 503 and dropped connections."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            response = httpx.post(
                f"{base}/api/v1/videos/generate",
                json={"prompt": prompt},
                headers={"Authorization": f"Bearer {token}", "Idempotency-Key": key},
                timeout=ANSWER_SECONDS,
            )
        except httpx.TimeoutException:
            problems.append(f"submit unanswered for {ANSWER_SECONDS:g} s")
            continue
        except httpx.TransportError:
            time.sleep(0.2)
            continue
        if response.status_code == 202:
            video: int = response.json()["video_id"]
            return video
        if response.status_code != 503:
            problems.append(f"submit answered {response.status_code}: {response.text[:200]}")
            return None
        time.sleep(0.3)
    problems.append("submit never accepted within 60 s")
    return None


def new_user(credits: int = 10_000) -> str:
    from kinora.jobs.accounts import create_user

    _user, token = create_user(
        f"chaos-{uuid.uuid4().hex[:12]}@kinora.test", credits=credits, plan="pro"
    )
    return token


def inject(cluster: Cluster, fault: str, rng: random.Random, videos: list[int]) -> None:
    if fault == "kill_pool":
        worker = psutil.Process(cluster.processes[rng.choice(["worker-1", "worker-2"])].pid)
        for child in worker.children(recursive=True):
            child.kill()
    elif fault == "kill_worker":
        cluster.restart(rng.choice(["worker-1", "worker-2"]), pause=1)
    elif fault == "kill_api":
        cluster.restart("api")
        cluster.wait_api()
    elif fault == "pause_redis":
        process = cluster.server().process
        assert process is not None
        os.kill(process.pid, signal.SIGSTOP)
        time.sleep(rng.uniform(1, 3))
        os.kill(process.pid, signal.SIGCONT)
    elif fault == "restart_redis":
        process = cluster.server().process
        assert process is not None
        process.kill()
        process.wait(10)
        cluster.server().start()
    elif fault == "failover":
        assert cluster.sentinels is not None
        cluster.sentinels.fail_over()
        cluster.sentinels.heal()
    elif fault == "flush_redis":
        cluster.redis_client().flushall()
    elif fault == "redeliver":
        # Not the current app: tasks of this process (the test session's) must stay
        # bound to the session's broker, not to this cluster's.
        broker, transport = connect.celery_broker(cluster.redis_url)
        app = Celery("chaos", broker=broker, set_as_current=False)
        app.conf.broker_transport_options = transport
        try:
            for video in videos:
                app.send_task("kinora.generate_video", args=[video], queue="kinora")
        finally:
            app.close()


def play_round(cluster: Cluster, number: int, rng: random.Random, fault: str) -> Round:
    result = Round(number, fault)
    started = time.monotonic()
    crashed_before = len(cluster.crashes)
    token = new_user()
    tag = uuid.uuid4().hex[:8]
    prompts = [f"Chaos {number}-{tag}: a paper lantern drifting, take {i}" for i in range(3)]
    if rng.random() < 0.3:
        prompts[1] = "[mock:transient] " + prompts[1]
    problems: list[str] = []
    # The first video three times at once with one key: one video, one charge.
    key = f"chaos-{tag}-0"
    results: list[int | None] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(submit(cluster.base, token, prompts[0], key, problems))
        )
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    if len(set(results)) != 1:
        problems.append(f"one Idempotency-Key, several answers: {results}")
    videos = [v for v in {*results} if v is not None]
    for i, prompt in enumerate(prompts[1:], 1):
        video = submit(cluster.base, token, prompt, f"chaos-{tag}-{i}", problems)
        if video is not None:
            videos.append(video)
    result.videos = videos
    deadline = time.monotonic() + 120
    watchers = [Watcher(cluster.base, v, token, deadline) for v in videos for _ in range(2)]
    for watcher in watchers:
        watcher.start()

    time.sleep(rng.uniform(0.2, 2.5))
    inject(cluster, fault, rng, videos)
    over = time.monotonic()
    if videos and rng.random() < 0.3:
        cancel(cluster.base, token, rng.choice(videos), problems)
    result.recovery = recovery(watchers, over)

    for watcher in watchers:
        watcher.join(max(1.0, deadline - time.monotonic()))
    wait_ended(cluster, videos, deadline)
    result.violations = problems + check(cluster, token, videos, prompts, watchers)
    result.events = sum(len(w.events) for w in watchers)
    result.crashes = cluster.crashes[crashed_before:]
    result.seconds = time.monotonic() - started
    return result


def cancel(base: str, token: str, video: int, problems: list[str]) -> None:
    for _ in range(20):
        try:
            response = httpx.post(
                f"{base}/api/v1/videos/{video}/cancel",
                headers={"Authorization": f"Bearer {token}"},
                timeout=ANSWER_SECONDS,
            )
        except httpx.TransportError:
            time.sleep(0.3)
            continue
        if response.status_code in (200, 409):
            return
        if response.status_code != 503:
            problems.append(f"cancel answered {response.status_code}")
            return
        time.sleep(0.3)


def recovery(watchers: list[Watcher], since: float, timeout: float = 60) -> float | None:
    """Seconds from the end of the fault until every watched video that had not ended
    shows a new event (or ends)."""
    before = {id(w): len(w.events) for w in watchers}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        waiting = [
            w
            for w in watchers
            if len(w.events) == before[id(w)]
            and not (w.events and w.events[-1]["type"] == "complete")
            and w.is_alive()
        ]
        if not waiting:
            return time.monotonic() - since
        time.sleep(0.05)
    return None


def wait_ended(cluster: Cluster, videos: list[int], deadline: float) -> None:
    while time.monotonic() < deadline and videos:
        marks = ",".join("?" * len(videos))
        rows = cluster.sql(f"SELECT status FROM videos WHERE id IN ({marks})", *videos)  # noqa: S608
        if all(status in TERMINAL for (status,) in rows):
            return
        time.sleep(0.2)


def check(
    cluster: Cluster, token: str, videos: list[int], prompts: list[str], watchers: list[Watcher]
) -> list[str]:
    """The invariants, over the database, the workers' logs and what every client saw."""
    found: list[str] = []
    statuses = {}
    for video in videos:
        (status,) = cluster.sql("SELECT status FROM videos WHERE id = ?", video)[0]
        statuses[video] = status
        if status not in TERMINAL:
            found.append(f"video {video} still {status}")
        ledger = cluster.sql(
            "SELECT kind, count(*) FROM credit_entries WHERE video_id = ? GROUP BY kind", video
        )
        kinds = dict(ledger)
        if kinds.get("charge") != 1:
            found.append(f"video {video} charged {kinds.get('charge', 0)} times")
        refunds = kinds.get("refund", 0)
        if refunds != (0 if status == "completed" else 1):
            found.append(f"video {video} {status} with {refunds} refunds")
    if videos:
        user = cluster.sql("SELECT user_id FROM videos WHERE id = ?", videos[0])[0][0]
        balance = cluster.sql("SELECT credits FROM users WHERE id = ?", user)[0][0]
        total = cluster.sql("SELECT sum(amount) FROM credit_entries WHERE user_id = ?", user)
        if balance != total[0][0]:
            found.append(f"user {user}: balance {balance}, ledger {total[0][0]}")
    jobs = cluster.model_jobs()
    for prompt in {*prompts}:
        if jobs[prompt_digest(prompt)] > 1:
            found.append(f"{jobs[prompt_digest(prompt)]} model jobs paid for {prompt!r}")
    for watcher in watchers:
        found += [f"watcher of {watcher.video_id}: {p}" for p in watcher.problems]
        found += [f"watcher of {watcher.video_id}: {p}" for p in seq_problems(watcher.events)]
        completes = [e for e in watcher.events if e["type"] == "complete"]
        if len(completes) != 1:
            found.append(f"watcher of {watcher.video_id} saw {len(completes)} complete events")
        elif completes[0]["status"] != statuses.get(watcher.video_id):
            found.append(
                f"watcher of {watcher.video_id} saw {completes[0]['status']}, "
                f"the database says {statuses.get(watcher.video_id)}"
            )
    return found


def seq_problems(events: list[dict[str, Any]]) -> list[str]:
    """Real events strictly increase; a jump is allowed only across a history_lost."""
    problems = []
    last: int | None = None
    announced = False
    for event in events:
        if event.get("code") == "history_lost":
            announced = True
            continue
        seq = int(event["seq"])
        if last is not None:
            if seq <= last:
                problems.append(f"seq {seq} after {last}")
            elif seq != last + 1 and not announced:
                problems.append(f"gap {last} -> {seq} without history_lost")
        last = seq
        announced = False
    if events and events[-1]["type"] != "complete":
        problems.append(f"last event is {events[-1]['type']}, not complete")
    return problems


def run(
    rounds: int, seed: int, root: Path, out: Any = sys.stdout, *, sentinel: bool = False
) -> list[Round]:
    rng = random.Random(seed)
    cluster = Cluster(root, sentinel=sentinel)
    faults = SENTINEL_FAULTS if sentinel else FAULTS
    results = []
    try:
        for number in range(1, rounds + 1):
            fault = faults[(number - 1) % len(faults)] if number <= len(faults) else None
            result = play_round(cluster, number, rng, fault or rng.choice(faults))
            results.append(result)
            recovered = "-" if result.recovery is None else f"{result.recovery:.2f} s"
            print(
                f"round {number:3d}  {result.fault:13s}  videos {len(result.videos)}  "
                f"events {result.events:4d}  recovery {recovered:>8s}  "
                f"{result.seconds:5.1f} s  violations {len(result.violations)}"
                + (f"  restarted: {', '.join(result.crashes)}" if result.crashes else ""),
                file=out,
                flush=True,
            )
            for violation in result.violations:
                print(f"    {violation}", file=out, flush=True)
    finally:
        cluster.stop()
    return results


def table(results: list[Round]) -> str:
    lines = [
        "| fault | rounds | videos | events seen | recovery median / max | crash restarts "
        "| violations |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for fault in dict.fromkeys([*FAULTS, *SENTINEL_FAULTS]):
        mine = [r for r in results if r.fault == fault]
        if not mine:
            continue
        times = sorted(r.recovery for r in mine if r.recovery is not None)
        spread = f"{times[len(times) // 2]:.2f} / {times[-1]:.2f} s" if times else "-"
        lines.append(
            f"| {fault} | {len(mine)} | {sum(len(r.videos) for r in mine)} | "
            f"{sum(r.events for r in mine)} | {spread} | {sum(len(r.crashes) for r in mine)} | "
            f"{sum(len(r.violations) for r in mine)} |"
        )
    lines.append(
        f"| all | {len(results)} | {sum(len(r.videos) for r in results)} | "
        f"{sum(r.events for r in results)} | | {sum(len(r.crashes) for r in results)} | "
        f"{sum(len(r.violations) for r in results)} |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument(
        "--sentinel", action="store_true", help="a Redis that fails over (Debian's Redis 7)"
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kinora-chaos-"))
    print(f"seed {args.seed}; state and logs in {root}", flush=True)
    results = run(args.rounds, args.seed, root, sentinel=args.sentinel)
    print(table(results), flush=True)
    if any(r.violations for r in results):
        sys.exit(1)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
