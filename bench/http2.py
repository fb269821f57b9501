"""HTTP/2: pages of twenty streams, as a browser page opens them, served five ways in
one run.

    python -m bench.http2 [--pages 100] [--streams 20] [--rate 100] [--events 50]
                          [--servers nginx-h2 granian-h2 hypercorn-h2 nginx-h1 kinora-h1]

Each page watches `--streams` videos (the same ones on every page: a dashboard), and
events are published to them at `--rate` events/s in all, `--events` each, then
`complete`. The ways it is served:

- `nginx-h2`: `kinora api` (uvicorn) behind nginx with deploy/nginx/kinora-https.conf:
  HTTPS and HTTP/2 to the page, one connection a page; HTTP/1.1 to Kinora (README,
  Behind nginx). What a browser page can use.
- `granian-h2`, `hypercorn-h2`: Kinora's app (`kinora.api.app:serve`) under granian and
  under hypercorn, speaking HTTPS and HTTP/2 themselves, no proxy.
- `nginx-h1`: the same nginx without TLS (kinora.conf), a connection per stream: what
  a program (not a browser, which holds six per origin) can use.
- `kinora-h1`: `kinora api` itself, a connection per stream: the reference.

The HTTP/2 clients speak it with the `h2` package over TLS (ALPN), one connection per
page, in two load processes; the HTTP/1.1 clients are bench.harness's.

Prints one JSON object: per way, streams open and in how long, delivered/expected,
latency percentiles (from the event's `sent_at` to its arrival), the CPU per delivered
event of everything serving (nginx included), RSS per stream, the connections the
clients held, and each figure as a ratio to `kinora-h1`'s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any, cast

import psutil

from bench.harness import (
    COMPLETE,
    ROOT,
    SENT_AT,
    SPAWN,
    LoadResult,
    World,
    close_all,
    load_process,
    measure,
    percentiles_ms,
    report,
    start_server,
    wait_up,
    within,
    world,
)
from kinora.cli.embedded import free_port
from tests.utils.nginx import certificate, front

SERVERS = ("nginx-h2", "granian-h2", "hypercorn-h2", "nginx-h1", "kinora-h1")
PATH = "/api/v1/videos/{video}/stream?token={token}"
# Kinora's app under the servers that speak HTTP/2 themselves, over TLS.
DIRECT = {
    "granian-h2": [
        sys.executable, "-m", "granian", "--interface", "asgi", "--factory",
        "--host", "127.0.0.1", "--port", "{port}", "--loop", "uvloop", "--backlog", "4096",
        "--backpressure", "100000", "--workers", "1", "--http", "auto",
        "--ssl-certificate", "{tls}/kinora.crt", "--ssl-keyfile", "{tls}/kinora.key",
        "kinora.api.app:serve",
    ],
    "hypercorn-h2": [
        sys.executable, "-m", "hypercorn", "--bind", "127.0.0.1:{port}", "-k", "uvloop",
        "--backlog", "4096", "--certfile", "{tls}/kinora.crt", "--keyfile", "{tls}/kinora.key",
        "kinora.api.app:serve()",
    ],
}  # fmt: skip


@dataclass
class Served:
    name: str
    port: int
    roots: list[psutil.Process]  # every process serving (and their children)
    h2: bool  # TLS and HTTP/2; else plain HTTP/1.1

    def processes(self) -> list[psutil.Process]:
        return [p for root in self.roots for p in [root, *root.children(recursive=True)]]

    def cpu_seconds(self) -> float:
        return sum(sum(p.cpu_times()[:2]) for p in self.processes())

    def rss(self) -> int:
        return sum(int(p.memory_info().rss) for p in self.processes())


@contextlib.contextmanager
def served(name: str, w: World, tls: Path) -> Iterator[Served]:
    if name in DIRECT:
        port = free_port()
        args = [a.format(port=port, tls=tls) for a in DIRECT[name]]
        log = (w.tmp / f"{name}.log").open("ab")
        process = subprocess.Popen(args, cwd=ROOT, env=w.env, stdout=log, stderr=log)
        try:
            trust = ssl.create_default_context(cafile=tls / "kinora.crt")
            wait_up(f"https://127.0.0.1:{port}/healthz", process, f"{name}; see {log.name}", trust)
            yield Served(name, port, [psutil.Process(process.pid)], h2=True)
        finally:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        return
    api = start_server("kinora", w)
    try:
        if name == "kinora-h1":
            yield Served(name, api.port, [psutil.Process(api.process.pid)], h2=False)
            return
        with (
            tempfile.TemporaryDirectory(prefix="kinora-nginx-") as root,
            front(Path(root), [api.port, api.port], https=name == "nginx-h2", tls=tls) as base,
        ):
            nginx = [p for p in psutil.process_iter(["cmdline"]) if _nginx_of(p, root)]
            port = int(base.rsplit(":", 1)[1])
            yield Served(
                name, port, [psutil.Process(api.process.pid), *nginx], h2=name == "nginx-h2"
            )
    finally:
        api.stop()


def _nginx_of(process: psutil.Process, root: str) -> bool:
    command = process.info["cmdline"] or []
    return bool(command) and "nginx" in command[0] and root in " ".join(command)


# -- the HTTP/2 load generator (runs in its own process) -------------------------------------


class H2Page(asyncio.Protocol):
    """One page: one TLS connection speaking HTTP/2, a stream per path on it, each read
    as bench.harness's clients read theirs (whole lines; `sent_at` by a regular
    expression)."""

    def __init__(self, paths: list[str], result: LoadResult) -> None:
        import h2.config
        import h2.connection

        self.paths = paths
        self.result = result
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.tails: dict[int, bytes] = {}
        self.open: set[int] = set()
        loop = asyncio.get_running_loop()
        self.answered: asyncio.Future[bool] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.heads = 0
        self.transport: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.WriteTransport, transport)
        self.conn.initiate_connection()
        # A window that never runs dry: the page reads everything at once.
        self.conn.increment_flow_control_window(2**30)
        for path in self.paths:
            stream = self.conn.get_next_available_stream_id()
            self.conn.send_headers(
                stream,
                [(":method", "GET"), (":scheme", "https"), (":authority", "127.0.0.1"),
                 (":path", path)],
                end_stream=True,
            )  # fmt: skip
            self.open.add(stream)
        self.transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        import h2.events

        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                ok = dict(event.headers).get(b":status") == b"200"
                self.heads += ok
                if not ok:
                    self.result.failed += 1
                    self.open.discard(event.stream_id)
                if self.heads + self.result.failed >= len(self.paths) or not ok:
                    self._answer(self.heads == len(self.paths))
            elif isinstance(event, h2.events.DataReceived):
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                self.lines(event.stream_id, event.data)
            elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                self.open.discard(event.stream_id)
                if not self.open:
                    self._close()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self._close()
        if self.transport is not None:
            self.transport.write(self.conn.data_to_send())

    def lines(self, stream: int, data: bytes) -> None:
        data = self.tails.get(stream, b"") + data
        cut = data.rfind(b"\n") + 1
        data, self.tails[stream] = data[:cut], data[cut:]
        received = time.time()
        latencies = self.result.latencies
        before = len(latencies)
        latencies.extend(received - float(m[1]) for m in SENT_AT.finditer(data))
        self.result.delivered += len(latencies) - before
        if COMPLETE in data:
            self.result.complete += 1

    def _answer(self, ok: bool) -> None:
        if not self.answered.done():
            self.answered.set_result(ok)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._answer(False)
        if not self.closed.done():
            self.closed.set_result(None)


def h2_process(
    port: int,
    pages: list[list[str]],
    cafile: str,
    connected_flag: MpEvent,
    finished_flag: MpEvent,
    results: Any,
    timeout: float,
) -> None:
    """Open one HTTP/2 connection per page (at most 64 handshakes at a time) with a
    stream per path, read each until `complete` or the timeout."""
    import uvloop

    async def main() -> LoadResult:
        loop = asyncio.get_running_loop()
        result = LoadResult()
        context = ssl.create_default_context(cafile=cafile)
        context.set_alpn_protocols(["h2"])
        gate = asyncio.Semaphore(64)
        clients: list[H2Page] = []

        async def connect(paths: list[str]) -> None:
            async with gate:
                page = H2Page(paths, result)
                try:
                    await loop.create_connection(
                        lambda: page, "127.0.0.1", port, ssl=context, server_hostname="127.0.0.1"
                    )
                except OSError:
                    result.failed += len(paths)
                    return
                clients.append(page)
                await page.answered
                result.connected += page.heads

        await within(timeout, [connect(p) for p in pages])
        connected_flag.set()
        await close_all(clients, timeout)  # type: ignore[arg-type]
        return result

    report(uvloop.run(main()), results, finished_flag)


# -- one measured run ---------------------------------------------------------------------------


def run(
    w: World, way: Served, *, pages: int, streams: int, rate: float, per_video: int, cafile: str,
    loaders: int = 2, timeout: float = 60.0,
) -> dict[str, Any]:  # fmt: skip
    ids = w.videos(streams)
    page_paths = [[PATH.format(video=v, token=w.token) for v in ids] for _ in range(pages)]
    flat = [path for paths in page_paths for path in paths]

    def loader(i: int, connected: MpEvent, finished: MpEvent, results: Any) -> Any:
        if way.h2:  # a connection per page
            pages_of = page_paths[i::loaders]
            return SPAWN.Process(
                target=h2_process,
                args=(way.port, pages_of, cafile, connected, finished, results, timeout),
            )
        return SPAWN.Process(  # a connection per stream
            target=load_process,
            args=(way.port, flat[i::loaders], connected, finished, results, timeout),
        )

    held = {"connections": 0}

    def count_connections() -> None:
        held["connections"] = sum(
            1
            for p in way.processes()
            for c in p.net_connections(kind="tcp")
            if c.laddr and c.laddr.port == way.port and c.raddr
        )

    measured = measure(
        w, way, ids, loader, loaders=loaders, per_video=per_video, rate=rate, timeout=timeout,
        at_connected=count_connections,
    )  # fmt: skip
    opened, delivered = measured.connected, measured.delivered
    expected = pages * streams * per_video
    return {
        "way": way.name,
        "pages": pages,
        "streams": pages * streams,
        "opened": opened,
        "failed": measured.failed,
        "open_seconds": round(measured.connect_seconds, 2),
        "client_connections": held["connections"],
        "delivered_ratio": round(delivered / expected, 4) if expected else None,
        "completed_streams": measured.complete,
        **percentiles_ms(measured.latencies),
        "cpu_us_per_delivery": round(measured.cpu / max(delivered, 1) * 1e6, 1),
        "rss_per_stream_kb": round(
            (measured.rss_connected - measured.rss_idle) / max(1, opened) / 1024, 1
        ),
    }


COMPARED = ("open_seconds", "p50_ms", "p99_ms", "cpu_us_per_delivery", "rss_per_stream_kb")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=100)
    parser.add_argument("--streams", type=int, default=20, help="streams (videos) per page")
    parser.add_argument("--rate", type=float, default=100.0, help="events per second, in all")
    parser.add_argument("--events", type=int, default=50, help="events per video")
    parser.add_argument("--servers", nargs="+", default=list(SERVERS), choices=SERVERS)
    args = parser.parse_args()
    runs = []
    with world() as w:
        tls = w.tmp / "tls"
        certificate(tls)
        for name in args.servers:
            with served(name, w, tls) as way:
                runs.append(
                    run(
                        w,
                        way,
                        pages=args.pages,
                        streams=args.streams,
                        rate=args.rate,
                        per_video=args.events,
                        cafile=str(tls / "kinora.crt"),
                    )
                )
    reference = next((r for r in runs if r["way"] == "kinora-h1"), None)
    for r in runs:
        if reference is not None and r is not reference:
            r["vs_kinora_h1"] = {
                key: round(r[key] / reference[key], 2) if r[key] and reference[key] else None
                for key in COMPARED
            }
    print(json.dumps({"benchmark": "http2", "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
