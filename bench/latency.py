"""Latency from `SSELogger.step()` in a worker process to the event parsed by an httpx
SSE client, through Redis, the API's StreamHub and sse-starlette.

Baseline in the same run: a plain redis-py subscriber on the same channel, in the
same client process, which shows what Redis pub/sub alone costs.

    python -m bench.latency [--events 500] [--rate 100]

Prints one JSON object: median, p90, p99 and max in milliseconds for both paths.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from kinora.embedded import EmbeddedRedis, free_port


def publisher(video_id: int, events: int, rate: float, go: Any) -> None:
    """The worker's side: one SSELogger, one step() per event, paced at `rate`/s."""
    from kinora.events import SSELogger

    go.wait()
    with SSELogger(video_id) as log:
        interval = 1.0 / rate
        start = time.perf_counter()
        for i in range(events):
            log.step(5, f"Processing video... {i}", progress=i * 100 // events, sent_at=time.time())
            pause = start + (i + 1) * interval - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
        log.complete()


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

    return {
        "n": len(ordered),
        "median_ms": round(statistics.median(ordered) * 1000, 3),
        "p90_ms": at(0.90),
        "p99_ms": at(0.99),
        "max_ms": at(1.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=500)
    parser.add_argument("--rate", type=float, default=100.0, help="events per second")
    args = parser.parse_args()

    with (
        tempfile.TemporaryDirectory() as tmp,
        EmbeddedRedis(Path(tmp) / "redis", persist=False) as srv,
    ):
        env = {
            **os.environ,
            "REDIS_URL": srv.url,
            "DATABASE_URL": f"sqlite:///{tmp}/bench.db",
            "KINORA_VAR_DIR": tmp,
            "SECRET_KEY": "bench",
        }
        os.environ.update(env)
        from kinora import db, jobs
        from kinora.accounts import create_user

        db.upgrade()
        user, token = create_user("bench@kinora.local", credits=0, plan="pro")
        with db.session_scope() as session:
            owner = session.merge(user)
            video, _ = jobs.create_video(
                session, owner, prompt="latency bench", parameters={}, cost=0, task_id="bench"
            )
        port = free_port()
        api = subprocess.Popen(
            [sys.executable, "-m", "kinora", "api", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("the API did not start")
                time.sleep(0.1)
            result = measure(base, srv.url, video.id, token, args.events, args.rate)
        finally:
            api.terminate()
            api.wait(10)
    print(json.dumps(result, indent=2))


def measure(
    base: str, redis_url: str, video_id: int, token: str, events: int, rate: float
) -> dict[str, Any]:
    sse: list[float] = []
    direct: list[float] = []
    ready = threading.Barrier(3, timeout=30)

    def read_direct() -> None:
        client = redis.Redis.from_url(redis_url)
        pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        pubsub.subscribe(f"video:{video_id}")
        ready.wait()
        try:
            while True:
                message = pubsub.get_message(timeout=10)
                if message is None:
                    continue
                received = time.time()
                event = json.loads(message["data"])
                if "sent_at" in event:
                    direct.append(received - event["sent_at"])
                if event["type"] == "complete":
                    return
        finally:
            pubsub.close()
            client.close()

    def read_sse() -> None:
        url = f"{base}/api/v1/videos/{video_id}/stream?token={token}"
        with (
            httpx.Client(timeout=httpx.Timeout(30)) as client,
            client.stream("GET", url) as response,
        ):
            lines = response.iter_lines()
            next(lines)  # the retry: line: the stream is open
            ready.wait()
            for line in lines:
                if not line.startswith("data: "):
                    continue
                received = time.time()
                event = json.loads(line[6:])
                if "sent_at" in event:
                    sse.append(received - event["sent_at"])
                if event["type"] == "complete":
                    return

    threads = [threading.Thread(target=read_direct), threading.Thread(target=read_sse)]
    for thread in threads:
        thread.start()
    go = multiprocessing.get_context("spawn").Event()
    worker = multiprocessing.get_context("spawn").Process(
        target=publisher, args=(video_id, events, rate, go)
    )
    worker.start()
    ready.wait()
    time.sleep(0.5)  # the hub's subscription is live once the stream has answered
    go.set()
    worker.join(events / rate + 60)
    for thread in threads:
        thread.join(60)
    return {
        "benchmark": "latency",
        "events": events,
        "rate_per_s": rate,
        "sse_via_hub": percentiles(sse),
        "baseline_redis_pubsub": percentiles(direct),
    }


if __name__ == "__main__":
    main()
