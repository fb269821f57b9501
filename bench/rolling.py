"""A rolling restart behind a real load balancer: `--clients` EventSource-like clients
of a video that publishes all the while, through Debian's nginx with the repository's
configuration (deploy/nginx/kinora.conf) to two `kinora api` processes; each process
is sent SIGTERM and started again on its port, one after the other. Each client
reconnects as EventSource does: with Last-Event-ID, after the `retry:` it was last
told. The same restart with DRAIN_SECONDS=0 is the baseline, in the same run.

    python -m bench.rolling [--clients 2000] [--rate 5] [--drain 10]

Prints one JSON object: per run, the events each client must have, the clients that
got every one exactly once and in order (must be all), the events lost and repeated
over all clients (must be 0), and the reconnect spread after each SIGTERM (when the
clients came back: first, median, p90, last, the most in any 100 ms), with the
drain's peak as a ratio to the baseline's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import uvloop

from bench.harness import COMPLETE, RawSSE, Server, World, start_server, world
from kinora.cli.embedded import free_port
from kinora.streaming import keys
from kinora.streaming.logger import SSELogger
from tests.utils.nginx import front

# An event's seq, from its data line (whole lines only: a line cut off with its
# connection is not counted).
SEQ = re.compile(rb'^data: \{"id":"\d+","seq":(\d+),', re.M)
RETRY = re.compile(rb"^retry: (\d+)$", re.M)
OPENS_PER_SECOND = 1000


class Connection(RawSSE):
    """One stream through the proxy, its chunked body decoded (the proxy re-chunks what
    it passes on as it arrives, so a chunk may end in the middle of a line), its
    events' seqs and `retry:` handed to its client."""

    def __init__(self, client: Client, request: bytes) -> None:
        super().__init__(request)
        self.client = client
        self.raw = b""  # the body as received, not yet decoded
        self.need: int | None = None  # bytes left of the chunk being read
        self.text = b""  # decoded, not yet a whole line
        self.complete = False

    def body(self, data: bytes) -> None:
        self.raw += data
        while True:
            if self.need is None:
                line_end = self.raw.find(b"\r\n")
                if line_end < 0:
                    break
                size = int(self.raw[:line_end].split(b";")[0], 16)
                self.raw = self.raw[line_end + 2 :]
                if size == 0:  # the body's end: where EventSource reconnects
                    self.lines(self.text)
                    self._close()
                    return
                self.need = size
            if len(self.raw) < self.need + 2:
                break
            self.text += self.raw[: self.need]
            self.raw = self.raw[self.need + 2 :]
            self.need = None
        cut = self.text.rfind(b"\n") + 1
        if cut:
            self.lines(self.text[:cut])
            self.text = self.text[cut:]

    def lines(self, data: bytes) -> None:
        self.client.seqs.extend(int(n) for n in SEQ.findall(data))
        told = RETRY.findall(data)
        if told:
            self.client.retry_ms = int(told[-1])
        if COMPLETE in data:
            self.complete = True
            self._close()


class Client:
    """Follows one stream to its `complete`, reconnecting as EventSource does."""

    def __init__(self, port: int, path: str) -> None:
        self.port = port
        self.path = path
        self.seqs: list[int] = []
        self.retry_ms = 3000
        self.reconnects: list[float] = []  # when it came back (monotonic)
        self.streaming = False  # a response is open and answered
        self.done = False

    async def run(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while time.monotonic() < deadline:
            last = f"Last-Event-ID: {self.seqs[-1]}\r\n" if self.seqs else ""
            request = f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{last}\r\n".encode()
            connection = Connection(self, request)
            try:
                await loop.create_connection(partial(_same, connection), "127.0.0.1", self.port)
                ok = self.streaming = await connection.answered
                await connection.closed
            except OSError:
                ok = False
            self.streaming = False
            if (ok and connection.complete) or b" 204 " in connection.status:
                self.done = True  # its `complete`; or a 204: it has the end already
                return
            await asyncio.sleep(self.retry_ms / 1000)
            self.reconnects.append(time.monotonic())


def _same(connection: Connection) -> Connection:
    return connection


def publish(video: int, rate: float, stop: threading.Event) -> int:
    with SSELogger(keys.video(video)) as log:
        i = 0
        while not stop.is_set():
            i += 1
            log.step(5, f"Processing video... {i}", progress=min(84, 10 + i // 10))
            time.sleep(1 / rate)
        log.complete()
    return i


def spread(times: list[float], since: float) -> dict[str, Any]:
    if not times:
        return {"reconnects": 0}
    ends = np.sort(np.array([t - since for t in times]))
    peak = int(max(np.searchsorted(ends, t + 0.1) - i for i, t in enumerate(ends)))
    return {
        "reconnects": len(ends),
        "first_s": round(float(ends[0]), 2),
        "median_s": round(float(np.median(ends)), 2),
        "p90_s": round(float(np.percentile(ends, 90)), 2),
        "last_s": round(float(ends[-1]), 2),
        "most_in_100ms": peak,
    }


def run(w: World, args: argparse.Namespace, drain: float) -> dict[str, Any]:
    settings = {
        "DRAIN_SECONDS": str(drain), "SSE_RETRY_MS": "1000", "MAX_STREAMS_PER_USER": "0",
    }  # fmt: skip
    ports = [free_port(), free_port()]
    servers = {port: start_server("kinora", w, settings=settings, port=port) for port in ports}
    (video,) = w.videos(1)
    stopping = threading.Event()
    sent: list[int] = []
    publisher = threading.Thread(
        target=lambda: sent.append(publish(video, args.rate, stopping)), daemon=True
    )
    signals: list[float] = []
    try:
        with (
            tempfile.TemporaryDirectory(prefix="kinora-nginx-") as tmp,
            front(Path(tmp), ports) as base,
        ):
            front_port = int(base.rsplit(":", 1)[1])
            path = f"/api/v1/videos/{video}/stream?token={w.token}"
            clients = [Client(front_port, path) for _ in range(args.clients)]
            publisher.start()

            def all_streaming() -> None:
                deadline = time.monotonic() + drain + 30
                while not all(c.streaming for c in clients) and time.monotonic() < deadline:
                    time.sleep(0.1)

            def restart_each() -> None:
                all_streaming()
                for port in ports:
                    old = servers[port]
                    signals.append(time.monotonic())
                    old.process.send_signal(signal.SIGTERM)
                    old.process.wait(drain + 30)
                    servers[port] = start_server("kinora", w, settings=settings, port=port)
                    all_streaming()  # every client back, on either process
                time.sleep(0.5)
                stopping.set()

            restarter = threading.Thread(target=restart_each, daemon=True)
            restarter.start()

            async def follow() -> None:
                deadline = time.monotonic() + 4 * drain + 90

                async def one(i: int, client: Client) -> None:
                    await asyncio.sleep(i / OPENS_PER_SECOND)  # the clients arrive over time
                    await client.run(deadline)

                await asyncio.gather(*(one(i, c) for i, c in enumerate(clients)))

            uvloop.run(follow())
            restarter.join(10)
    finally:
        stopping.set()
        publisher.join(10)
        for server in servers.values():
            stop_server(server)
    end = sent[0] + 1 if sent else 0  # the steps, then `complete`
    want = list(range(1, end + 1))
    lost = sum(len(set(want) - set(c.seqs)) for c in clients)
    missing = sorted({n for c in clients for n in set(want) - set(c.seqs)})
    repeated = sum(len(c.seqs) - len(set(c.seqs)) for c in clients)
    windows = [*signals[1:], float("inf")]
    return {
        "drain_seconds": drain,
        "clients": args.clients,
        "events_each": end,
        "clients_with_every_event_once": sum(c.seqs == want for c in clients),
        "clients_that_ended": sum(c.done for c in clients),
        "lost": lost,
        "lost_seqs": missing[:10],
        "repeated": repeated,
        "restarts": [
            spread([t for c in clients for t in c.reconnects if at <= t < until], at)
            for at, until in zip(signals, windows, strict=True)
        ],
    }


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(20)
        except Exception:
            server.process.kill()
            server.process.wait(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=5.0, help="events per second")
    parser.add_argument("--drain", type=float, default=10.0, help="DRAIN_SECONDS")
    args = parser.parse_args()
    with world() as w:
        baseline = run(w, args, 0.0)
        drained = run(w, args, args.drain)
    peaks = [
        d.get("most_in_100ms", 0) / max(1, b.get("most_in_100ms", 1))
        for b, d in zip(baseline["restarts"], drained["restarts"], strict=True)
    ]
    print(
        json.dumps(
            {
                "benchmark": "rolling",
                "baseline": baseline,
                "drain": drained,
                "peak_vs_baseline": round(max(peaks), 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
