"""The drain's reconnect spread: `--streams` SSE clients of one video on `kinora api
--workers 2`, then SIGTERM, as a rolling restart sends it. When each client's response
ends is when it would come back to another process: spread over DRAIN_SECONDS, or (the
baseline, DRAIN_SECONDS=0) all at once, in the same run.

    python -m bench.drain [--streams 1000] [--drain 10]

Prints one JSON object: per run, the streams that ended cleanly with a last `retry:`
(must be all), when they ended after the signal (first, median, p90, last), the most
that ended in any 100 ms (the burst the other processes meet), and the drain's peak as
a ratio to the baseline's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import time
from typing import Any

import numpy as np
import uvloop

from bench.harness import RawSSE, start_server, world
from kinora.streaming import keys
from kinora.streaming.logger import SSELogger


class Client(RawSSE):
    def __init__(self, path: str) -> None:
        super().__init__(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        self.ended_at = 0.0
        self.goodbye = False  # a `retry:` after the first events
        self.clean = False  # the chunked body's last chunk arrived
        self.data = False

    def lines(self, data: bytes) -> None:
        if b"data: " in data:
            self.data = True
        if self.data and b"retry: " in data.split(b"data: ")[-1]:
            self.goodbye = True
        if data.endswith(b"0\r\n\r\n") or b"\r\n0\r\n" in data:
            # The body's end: where EventSource reconnects (the connection itself may
            # be kept alive until the server closes it).
            self.clean = True
            self.ended_at = time.monotonic()
            self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended_at:
            self.ended_at = time.monotonic()
        super().connection_lost(exc)


def run(w: Any, streams: int, drain: float) -> dict[str, Any]:
    settings = {"DRAIN_SECONDS": str(drain), "MAX_STREAMS_PER_USER": "0"}
    server = start_server("kinora", w, workers=2, settings=settings)
    try:
        (video,) = w.videos(1)
        SSELogger(keys.video(video)).step(1, "Validating request parameters...", progress=3)
        path = f"/api/v1/videos/{video}/stream?token={w.token}"
        return uvloop.run(measure(server.process, server.port, path, streams, drain))
    finally:
        if server.process.poll() is None:
            server.process.kill()
        server.process.wait(10)


async def measure(
    server: subprocess.Popen[bytes], port: int, path: str, streams: int, drain: float
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    clients = [Client(path) for _ in range(streams)]
    gate = asyncio.Semaphore(256)

    async def connect(client: Client) -> None:
        async with gate:
            await loop.create_connection(lambda: client, "127.0.0.1", port)
            await client.answered

    await asyncio.gather(*(connect(c) for c in clients))
    await asyncio.sleep(1.0)  # every stream has its first events
    signalled = time.monotonic()
    server.send_signal(signal.SIGTERM)
    async with asyncio.timeout(drain + 30):
        await asyncio.gather(*(c.closed for c in clients))
    ends = np.sort(np.array([c.ended_at - signalled for c in clients]))
    peak = int(max(np.searchsorted(ends, t + 0.1) - i for i, t in enumerate(ends)))
    return {
        "drain_seconds": drain,
        "streams": streams,
        "ended_with_a_retry": sum(c.goodbye for c in clients),
        "ended_cleanly": sum(c.clean for c in clients),
        "first_s": round(float(ends[0]), 3),
        "median_s": round(float(np.median(ends)), 3),
        "p90_s": round(float(np.percentile(ends, 90)), 3),
        "last_s": round(float(ends[-1]), 3),
        "most_in_100ms": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--drain", type=float, default=10.0)
    args = parser.parse_args()
    with world() as w:
        burst = run(w, args.streams, 0.0)
        spread = run(w, args.streams, args.drain)
    ratio = round(spread["most_in_100ms"] / max(1, burst["most_in_100ms"]), 3)
    print(
        json.dumps(
            {"benchmark": "drain", "baseline": burst, "drain": spread, "peak_vs_baseline": ratio},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
