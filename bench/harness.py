"""What the benchmarks share: a Redis, a database with videos to watch, the servers
under test as subprocesses (one uvicorn worker each), SSE load generators in their
own processes reading with raw asyncio sockets, and a publisher in another process
calling `SSELogger.step()` like a worker.

Every wait is bounded; every figure comes back as plain numbers for JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import httpx
import numpy as np
import psutil

from kinora.cli.embedded import EmbeddedRedis, free_port
from kinora.streaming import keys

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
SPAWN = multiprocessing.get_context("spawn")


@dataclass
class World:
    """Redis, a SQLite database, a user and its token: what every server needs."""

    redis: EmbeddedRedis
    env: dict[str, str]
    token: str
    user_id: int
    tmp: Path
    next_video: int = 0

    def videos(self, count: int) -> list[int]:
        """Fresh videos (rows for the Kinora server; plain ids for the others)."""
        from kinora.core import db
        from kinora.core.models import User
        from kinora.jobs import store

        ids = []
        with db.session_scope() as session:
            user = session.get(User, self.user_id)
            assert user is not None
            for _ in range(count):
                video, _ = store.create_video(
                    session, user, prompt="bench", parameters={}, cost=0, task_id="bench"
                )
                ids.append(video.id)
        return ids


@contextlib.contextmanager
def world() -> Iterator[World]:
    with tempfile.TemporaryDirectory(prefix="kinora-bench-") as tmp_name:
        tmp = Path(tmp_name)
        with EmbeddedRedis(tmp / "redis", persist=False) as server:
            env = {
                **os.environ,
                "REDIS_URL": server.url,
                "DATABASE_URL": f"sqlite:///{tmp / 'bench.db'}",
                "KINORA_VAR_DIR": str(tmp),
                "SECRET_KEY": "bench",
                # a slow reader is cut at this depth; the load generators keep up
                "STREAM_QUEUE_SIZE": "1024",
                # thousands of watchers of one user's videos: no per-user stream cap
                "MAX_STREAMS_PER_USER": "0",
                # bench.cores queues videos at once: no per-user submit rate limit
                "GENERATE_RATE_LIMIT": "0",
            }
            os.environ.update(env)
            from kinora.core import db
            from kinora.core.config import get_settings
            from kinora.jobs.accounts import create_user

            get_settings.cache_clear()
            db.get_engine.cache_clear()
            db.upgrade()
            user, token = create_user("bench@kinora.local", credits=10**9, plan="pro")
            yield World(server, env, token, user.id, tmp)
            db.get_engine().dispose()


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    path: str  # with {video} and {token}

    def url_path(self, video_id: int, token: str) -> str:
        return self.path.format(video=video_id, token=token)

    def processes(self) -> list[psutil.Process]:
        """The server's process and its workers' (granian serves from a child)."""
        root = psutil.Process(self.process.pid)
        return [root, *root.children(recursive=True)]

    def rss(self) -> int:
        return sum(int(p.memory_info().rss) for p in self.processes())

    def cpu_seconds(self) -> float:
        """CPU time (user and system) of the server and its worker processes so far."""
        root = psutil.Process(self.process.pid)
        return sum(sum(p.cpu_times()[:2]) for p in [root, *root.children(recursive=True)])

    def redis_connections(self, redis_port: int) -> int:
        conns = [c for p in self.processes() for c in p.net_connections(kind="tcp")]
        return sum(1 for c in conns if c.raddr and c.raddr.port == redis_port)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


# Kinora's app (kinora.api.app:serve, as `kinora api` serves it) under the other ASGI
# servers: granian (Rust I/O) and hypercorn, with the same loop and listen backlog.
SERVED_BY = {
    "kinora-granian": [
        sys.executable, "-m", "granian", "--interface", "asgi", "--factory",
        "--host", "127.0.0.1", "--port", "{port}", "--loop", "uvloop", "--backlog", "4096",
        # granian answers at most `backpressure` requests at once per worker (by default
        # the backlog): a stream is a request that lasts, so the rest would wait
        "--backpressure", "100000", "--workers", "1", "kinora.api.app:serve",
    ],
    "kinora-hypercorn": [
        sys.executable, "-m", "hypercorn", "--bind", "127.0.0.1:{port}", "-k", "uvloop",
        "--backlog", "4096", "kinora.api.app:serve()",
    ],
}  # fmt: skip


def start_server(
    name: str,
    w: World,
    *,
    workers: int = 1,
    settings: dict[str, str] | None = None,
    port: int | None = None,
) -> Server:
    """`kinora` (our API, `workers` processes on one port), `naive` (a pub/sub
    connection per client, as in the original notes) or `broadcaster` (sse-starlette +
    the broadcaster package). `settings`: environment variables of this server's own;
    `port`: a given one (a process restarted where it was), else a free one."""
    port = port or free_port()
    if name == "kinora":
        args = [
            sys.executable,
            "-m",
            "kinora",
            "api",
            "--port",
            str(port),
            "--workers",
            str(workers),
        ]
        path = "/api/v1/videos/{video}/stream?token={token}"
    elif name in SERVED_BY:  # Kinora's app under another ASGI server, as it serves it
        args = [a.format(port=port) for a in SERVED_BY[name]]
        path = "/api/v1/videos/{video}/stream?token={token}"
    else:
        args = [
            sys.executable, "-m", "uvicorn", f"bench.{name}_server:app", "--port", str(port),
            "--log-level", "warning", "--loop", "uvloop", "--http", "httptools",
        ]  # fmt: skip
        path = "/stream/{video}"
    log = (w.tmp / f"{name}.log").open("ab")
    env = {**w.env, **(settings or {})}
    process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=log)
    wait_up(f"http://127.0.0.1:{port}/healthz", process, f"the {name} server; see {log.name}")
    return Server(name, process, port, path)


def wait_up(url: str, process: subprocess.Popen[bytes], what: str, verify: Any = True) -> None:
    """Until `url` answers 200 (30 s at most, and not after `process` ended)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(url, timeout=1, verify=verify).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what}: did not start")
        time.sleep(0.1)


def stream_path(name: str, server: Server, w: World, video: int) -> str:
    """The path a load's client of `name` asks for: Kinora's app (`kinora`, or under
    another server) with the video's scoped token, as `stream_url` gives it;
    `kinora-api-token` with the user's API token; a peer its own path."""
    if name == "kinora" or name in SERVED_BY:
        from kinora.core.tokens import sign_scoped

        return f"/api/v1/videos/{video}/stream?token={sign_scoped(video, w.user_id)}"
    return server.url_path(video, w.token)


class ServerLog:
    """A server's log in the world (bench servers of one kind share a file): the
    warnings and errors it logged since this was made."""

    def __init__(self, w: World, kind: str) -> None:
        self.file = w.tmp / f"{kind}.log"
        self.seen = len(self.lines()) if self.file.exists() else 0

    def lines(self) -> list[str]:
        return self.file.read_text(errors="replace").splitlines()

    def warnings(self) -> list[str]:
        new = self.lines()[self.seen :] if self.file.exists() else []
        return [line for line in new if " WARNING " in line or " ERROR " in line]


# -- the load generator (runs in its own process) ------------------------------------------


@dataclass
class LoadResult:
    connected: int = 0
    failed: int = 0
    delivered: int = 0  # events received (not counting `complete`)
    complete: int = 0  # connections that saw `complete`
    latencies: list[float] = field(default_factory=list)


SENT_AT = re.compile(rb'"sent_at":([0-9.e+-]+)')
COMPLETE = b'"type":"complete"'


class RawSSE(asyncio.Protocol):
    """One SSE connection on a raw socket, read in `data_received` as bytes arrive: it
    sends its request, checks the response's status line (`answered`), and hands the
    body on in whole lines (`lines`), so a `data:` line never arrives in two pieces.
    (uvicorn frames the body in chunks even for HTTP/1.0; a chunk is one write of
    whole frames, so its size lines are lines of their own, ignored.)"""

    def __init__(self, request: bytes, ends: int = 1) -> None:
        self.request = request
        self.ends = ends  # the `complete` events that end it (a many-jobs stream: one per job)
        self.head = b""  # the response head, until it is complete
        self.tail = b""  # a line that has not fully arrived yet
        self.answered: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.WriteTransport | None = None
        self.status = b""  # the response's status line

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.WriteTransport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if not self.answered.done():
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            self.status = self.head.split(b"\r\n", 1)[0]
            ok = b" 200 " in self.status
            self.answered.set_result(ok)
            if not ok:
                self._close()
                return
            data, self.head = self.head[end + 4 :], b""
        self.body(data)

    def body(self, data: bytes) -> None:
        """The body as it arrives: cut into whole lines (`lines`)."""
        data = self.tail + data
        cut = data.rfind(b"\n") + 1
        data, self.tail = data[:cut], data[cut:]
        self.lines(data)
        if COMPLETE in data:
            self.ends -= data.count(COMPLETE)
            if self.ends <= 0:
                self._close()

    def lines(self, data: bytes) -> None:
        """Whole lines of the body, as they arrive."""

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answered.done():
            self.answered.set_result(False)
        if not self.closed.done():
            self.closed.set_result(None)


async def within(seconds: float, awaitables: Iterable[Awaitable[T]]) -> list[T] | None:
    """Every awaitable's result, or None when they are not all done within `seconds`
    (the rest are cancelled): a load generator never waits without a bound."""
    try:
        async with asyncio.timeout(seconds):
            return await asyncio.gather(*awaitables)
    except TimeoutError:
        return None


async def close_all(clients: Sequence[RawSSE], seconds: float) -> None:
    """Let every client's stream end within `seconds`, then close what is still open."""
    await within(seconds, [client.closed for client in clients])
    for client in clients:
        client._close()


class SSEClient(RawSSE):
    """A load generator's client: the events' `sent_at` are found with a regular
    expression over the whole read, which costs a few microseconds an event, so the
    load generator is not what is measured."""

    def __init__(self, path: str, result: LoadResult, ends: int = 1) -> None:
        super().__init__(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode(), ends)
        self.result = result

    def lines(self, data: bytes) -> None:
        received = time.time()
        latencies = self.result.latencies
        before = len(latencies)
        latencies.extend(received - float(m[1]) for m in SENT_AT.finditer(data))
        self.result.delivered += len(latencies) - before
        if COMPLETE in data and self.ends <= data.count(COMPLETE):
            self.result.complete += 1  # the stream has every `complete` it waits for


def load_process(
    port: int,
    paths: list[str],
    connected_flag: MpEvent,
    finished_flag: MpEvent,
    results: Any,
    timeout: float,
    ends: int = 1,
) -> None:
    """Open one SSE connection per path (at most 256 handshakes at a time), read each
    until `complete` or the timeout."""
    import uvloop

    async def main() -> LoadResult:
        loop = asyncio.get_running_loop()
        result = LoadResult()
        gate = asyncio.Semaphore(256)
        clients: list[SSEClient] = []

        async def connect(path: str) -> None:
            async with gate:
                client = SSEClient(path, result, ends)
                try:
                    await loop.create_connection(lambda: client, "127.0.0.1", port)
                except OSError:
                    result.failed += 1
                    return
                clients.append(client)
                if await client.answered:
                    result.connected += 1
                else:
                    result.failed += 1

        await within(timeout, [connect(p) for p in paths])
        connected_flag.set()
        await close_all(clients, timeout)
        return result

    report(uvloop.run(main()), results, finished_flag)


def report(result: LoadResult, results: Any, finished_flag: MpEvent) -> None:
    """A load process's figures, handed to the measuring process (`measure`)."""
    latencies = np.array(result.latencies, dtype=np.float64)
    results.put(
        (result.connected, result.failed, result.delivered, result.complete, latencies.tobytes())
    )
    finished_flag.set()


# -- the publisher (runs in its own process, like a worker) -----------------------------------


def publisher_process(
    env: dict[str, str], videos: list[int], per_video: int, rate: float, go: MpEvent, done: Any
) -> None:
    os.environ.update(env)
    from kinora.streaming.logger import SSELogger

    go.wait(120)
    loggers = [SSELogger(keys.video(v)) for v in videos]
    interval = 1.0 / rate
    start = time.perf_counter()
    costs = []
    n = 0
    for i in range(per_video):
        for log in loggers:
            t0 = time.perf_counter()
            log.step(
                5, f"Processing video... {i}", progress=i * 100 // per_video, sent_at=time.time()
            )
            costs.append(time.perf_counter() - t0)
            n += 1
            pause = start + n * interval - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
    for log in loggers:
        log.complete()
    done.put(float(np.median(costs)) if costs else 0.0)


# -- one measured run ---------------------------------------------------------------------------


def percentiles_ms(values: np.ndarray) -> dict[str, float | None]:
    if values.size == 0:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None}
    q = np.percentile(values, [50, 90, 99, 100]) * 1000
    return {
        k: round(float(v), 2)
        for k, v in zip(("p50_ms", "p90_ms", "p99_ms", "max_ms"), q, strict=True)
    }


def run_load(
    w: World,
    server: Server,
    *,
    watchers: int,
    videos: int,
    rate: float,
    per_video: int,
    loaders: int = 2,
    settle: float = 2.0,
    timeout: float = 120.0,
    many: int = 0,
) -> dict[str, Any]:
    """`watchers` SSE clients spread over `videos` videos; `per_video` events published
    to each at `rate` events/s in all. Returns delivery, latency and server figures.
    `many`: each client watches `many` of the videos on one many-jobs stream
    (`GET /api/v1/stream?video=…`) instead of one."""
    ids = w.videos(videos)
    if many:
        paths = [
            "/api/v1/stream?"
            + "&".join(f"video={ids[(i + j) % videos]}" for j in range(many))
            + f"&token={w.token}"
            for i in range(watchers)
        ]
    else:
        paths = [server.url_path(ids[i % videos], w.token) for i in range(watchers)]

    def loader(i: int, connected: MpEvent, finished: MpEvent, results: Any) -> Any:
        return SPAWN.Process(
            target=load_process,
            args=(server.port, paths[i::loaders], connected, finished, results, timeout,
                  max(many, 1)),
        )  # fmt: skip

    at_connected = {"redis": 0}

    def count_redis() -> None:
        at_connected["redis"] = server.redis_connections(w.redis.port)

    run = measure(
        w, server, ids, loader, loaders=loaders, per_video=per_video, rate=rate,
        timeout=timeout, settle=settle, at_connected=count_redis,
    )  # fmt: skip
    connected_total, delivered, latencies = run.connected, run.delivered, run.latencies
    expected = watchers * per_video * max(many, 1)
    return {
        "server": server.name,
        "watchers": watchers,
        "videos": videos,
        "events_per_s": rate,
        "events_per_video": per_video,
        "connected": connected_total,
        "connect_failures": run.failed,
        "connect_seconds": round(run.connect_seconds, 2),
        "delivered_ratio": round(delivered / expected, 4) if expected else None,
        "completed_streams": run.complete,
        **percentiles_ms(latencies),
        "rss_per_connection_kb": round(
            (run.rss_connected - run.rss_idle) / max(1, connected_total) / 1024, 1
        ),
        "server_rss_mb": round(run.rss_connected / 2**20, 1),
        "server_redis_connections": at_connected["redis"],
        # The server's CPU while the events were published and delivered, per delivery.
        "cpu_us_per_delivery": round(run.cpu / max(delivered, 1) * 1e6, 1),
        "publish_step_median_us": round(run.step_median * 1e6, 1),
    }


class Measurable(Protocol):
    def rss(self) -> int: ...

    def cpu_seconds(self) -> float: ...


@dataclass
class Measured:
    connect_seconds: float  # until every load process had its streams open
    rss_idle: int  # the server's before the streams, and with them open
    rss_connected: int
    cpu: float  # the server's CPU while the events were published and delivered
    step_median: float  # the publisher's median SSELogger.step()
    connected: int
    failed: int
    delivered: int
    complete: int
    latencies: np.ndarray


def measure(
    w: World,
    server: Measurable,
    ids: list[int],
    loader: Callable[[int, MpEvent, MpEvent, Any], Any],
    *,
    loaders: int,
    per_video: int,
    rate: float,
    timeout: float,
    settle: float = 2.0,
    at_connected: Callable[[], None] | None = None,
) -> Measured:
    """One measured run: `loaders` load processes (`loader(i, connected, finished,
    results)` makes each; it reports with `report`) open their streams, then a
    publisher sends `per_video` events to each of `ids` at `rate` events/s in all.
    `at_connected` runs once every stream is open (what to count then)."""
    rss_idle = server.rss()
    results = SPAWN.Queue()
    connected = [SPAWN.Event() for _ in range(loaders)]
    finished = [SPAWN.Event() for _ in range(loaders)]
    procs = [loader(i, connected[i], finished[i], results) for i in range(loaders)]
    for p in procs:
        p.start()
    started = time.monotonic()
    for flag in connected:
        flag.wait(timeout)
    connect_seconds = time.monotonic() - started
    time.sleep(settle)  # every subscription live, for the designs that need it
    rss_connected = server.rss()
    if at_connected is not None:
        at_connected()
    go = SPAWN.Event()
    done = SPAWN.Queue()
    publisher = SPAWN.Process(
        target=publisher_process, args=(w.env, ids, per_video, rate, go, done)
    )
    publisher.start()
    cpu_before = server.cpu_seconds()
    go.set()
    step_median = done.get(timeout=timeout + per_video * len(ids) / rate)
    parts = [results.get(timeout=timeout + 30) for _ in procs]
    cpu = server.cpu_seconds() - cpu_before
    for p in [*procs, publisher]:
        p.join(30)
    return Measured(
        connect_seconds=connect_seconds,
        rss_idle=rss_idle,
        rss_connected=rss_connected,
        cpu=cpu,
        step_median=step_median,
        connected=sum(part[0] for part in parts),
        failed=sum(part[1] for part in parts),
        delivered=sum(part[2] for part in parts),
        complete=sum(part[3] for part in parts),
        latencies=np.concatenate([np.frombuffer(part[4], dtype=np.float64) for part in parts]),
    )
