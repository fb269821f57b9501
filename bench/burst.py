"""A burst of new connections: one process opens `clients` streams within `seconds`
and never retries, while every video gets live events.

    python -m bench.burst [--clients 10000] [--seconds 2.5] [--videos 10] [--rate 100]

`bench.storm` retries a refused connection after 0.5 s, as EventSource does, so a
connection the server lost never shows there; here it is counted. Each client opens
its stream once (Kinora with the video's scoped token, as `stream_url` gives it, or,
the `kinora-api-token` run, with the user's API token; the peers on their own path)
and reads it until `complete`. The publisher sends `rate` events/s over all videos
from the burst's start for `--events` seconds, then `complete`.

Per server: streams opened; refused (the connect failed) and reset before the head
(the connection was taken, then closed before a response); the seconds until every
stream that opened had its head; delivered/expected of the events sent after each
stream's head (the peers have no history, so only those count for anyone); their
p99 latency; and the kernel's own counts over the run (listen queue overflows and
drops, resets sent), which say where a lost connection went. The floor is Kinora's
stream design with nothing else (bench/floor_server.py).

Prints one JSON object with the last round's figures beside the new (`before`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import time
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import (
    COMPLETE,
    SENT_AT,
    SPAWN,
    RawSSE,
    ServerLog,
    World,
    close_all,
    percentiles_ms,
    publisher_process,
    start_server,
    stream_path,
    within,
    world,
)

HOST = "127.0.0.1"

# The last round's figures (README, "A burst of new connections"), printed beside the
# new ones so a run says what changed: 10,000 streams in 2.5 s, 10 videos, 100 events/s.
# The last round's figures, at the defaults, on the machine that measured them: main
# before the stream route was served in front of FastAPI, with uvicorn's backlog of
# 2,048 (commit 4371e87).
BEFORE: dict[str, dict[str, Any]] = {
    "kinora": {
        "opened": 9492, "reset_before_head": 508, "all_open_seconds": 27.91, "p99_ms": 157.8,
    },
    "kinora-api-token": {
        "opened": 6231, "reset_before_head": 769, "unanswered_after_90_s": 3000,
        "all_open_seconds": 56.16, "p99_ms": 657.05,
    },
}  # fmt: skip

KERNEL_COUNTS = {
    "TcpExt": ("ListenOverflows", "ListenDrops", "SyncookiesSent"),
    "Tcp": ("OutRsts", "AttemptFails", "EstabResets"),
}


def kernel_counts() -> dict[str, int]:
    """The TCP counters that say where a connection went (/proc/net/netstat, snmp)."""
    counts: dict[str, int] = {}
    for name in ("/proc/net/netstat", "/proc/net/snmp"):
        try:
            rows = Path(name).read_text().splitlines()
        except OSError:
            continue
        for head, values in zip(rows[::2], rows[1::2], strict=False):
            kind, *fields = head.split()
            wanted = KERNEL_COUNTS.get(kind.rstrip(":"), ())
            for field_name, value in zip(fields, values.split()[1:], strict=False):
                if field_name in wanted:
                    counts[field_name] = int(value)
    return counts


class BurstClient(RawSSE):
    """One stream: when its head came, and the latency of each event sent after it."""

    def __init__(self, request: bytes, latencies: list[float], counts: dict[str, int]) -> None:
        super().__init__(request)
        self.latencies = latencies
        self.counts = counts
        self.head_at = 0.0  # wall clock, to compare with the events' sent_at
        self.answered.add_done_callback(self._answered)

    def _answered(self, answered: asyncio.Future[bool]) -> None:
        if answered.result():
            self.head_at = time.time()
            self.counts["opened"] += 1
        elif self.status:
            self.counts["not_200"] += 1
        else:
            self.counts["reset_before_head"] += 1

    def lines(self, data: bytes) -> None:
        received = time.time()
        for match in SENT_AT.finditer(data):
            self.counts["events"] += 1
            sent = float(match[1])
            if sent >= self.head_at:
                self.latencies.append(received - sent)
        if COMPLETE in data:
            self.counts["completed"] += 1


def burst_process(
    port: int,
    requests: list[bytes],
    seconds: float,
    go: MpEvent,
    opened_flag: MpEvent,
    results: Any,
    timeout: float,
) -> None:
    """Open every request's connection at its moment in the burst, once; read each
    until `complete` or the timeout."""
    import uvloop

    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        counts = dict.fromkeys(
            ("opened", "refused", "reset_before_head", "not_200", "completed", "events"), 0
        )
        latencies: list[float] = []
        clients: list[BurstClient] = []
        heads: list[float] = []

        async def open_one(request: bytes, at: float) -> None:
            await asyncio.sleep(max(0.0, at - loop.time()))
            client = BurstClient(request, latencies, counts)
            try:
                await loop.create_connection(lambda: client, HOST, port)
            except OSError:
                counts["refused"] += 1
                return
            clients.append(client)
            if await client.answered:
                heads.append(loop.time())

        go.wait(60)
        start = loop.time()
        step = seconds / max(1, len(requests))
        await within(timeout, [open_one(r, start + i * step) for i, r in enumerate(requests)])
        burst_seconds = loop.time() - start
        opened_flag.set()
        await close_all(clients, timeout)
        return {
            **counts,
            "all_open_seconds": round(max(heads, default=start) - start, 2),
            "burst_seconds": round(burst_seconds, 2),
            "latencies": np.array(latencies, dtype=np.float64).tobytes(),
        }

    results.put(uvloop.run(main()))


def top_frames(collapsed: Path, count: int = 12) -> list[str]:
    """The functions the server spent its samples in (self time), from py-spy's
    collapsed stacks: where a run's time went."""
    own: dict[str, int] = {}
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        leaf = stack.rsplit(";", 1)[-1]
        own[leaf] = own.get(leaf, 0) + int(samples)
        total += int(samples)
    ranked = sorted(own.items(), key=lambda kv: -kv[1])[:count]
    return [f"{100 * n / max(1, total):.1f}% {frame}" for frame, n in ranked]


def run_burst(
    w: World,
    name: str,
    *,
    clients: int,
    seconds: float,
    videos: int,
    rate: float,
    events: float,
    profile: Path | None = None,
) -> dict[str, Any]:
    ids = w.videos(videos)
    kind = "kinora" if name.startswith("kinora") else name
    server_log = ServerLog(w, kind)
    server = start_server(kind, w)
    try:
        requests = []
        for i in range(clients):
            video = ids[i % videos]
            path = stream_path(name, server, w, video)
            requests.append(
                f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n"
                "Accept: text/event-stream\r\n\r\n".encode()
            )
        per_video = max(1, int(rate * events / videos))
        go = SPAWN.Event()
        opened = SPAWN.Event()
        results = SPAWN.Queue()
        timeout = 90.0
        loader = SPAWN.Process(
            target=burst_process,
            args=(server.port, requests, seconds, go, opened, results, timeout),
        )
        done = SPAWN.Queue()
        publisher = SPAWN.Process(
            target=publisher_process, args=(w.env, ids, per_video, rate, go, done)
        )
        loader.start()
        publisher.start()
        time.sleep(1.5)  # both processes up and waiting
        kernel_before = kernel_counts()
        spy = None
        if profile is not None:  # py-spy (pip install py-spy), sampling the server
            out = profile / f"{name}.txt"
            record = ["py-spy", "record", "--format", "raw", "-r", "200"]
            spy = subprocess.Popen(
                [*record, "-d", str(int(seconds + events)), "-o", str(out),
                 "-p", str(server.process.pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        go.set()
        done.get(timeout=timeout + events)
        opened.wait(timeout)
        part = results.get(timeout=timeout + 30)
        kernel_after = kernel_counts()
        for p in (loader, publisher):
            p.join(30)
        if spy is not None:
            spy.wait(60)
    finally:
        server.stop()
    warnings = server_log.warnings()
    latencies = np.frombuffer(part.pop("latencies"), dtype=np.float64)
    expected_after_head = part["opened"]  # each opened stream: its `complete` at least
    frames = top_frames(profile / f"{name}.txt") if profile is not None else None
    return {
        "server": name,
        "clients": clients,
        "videos": videos,
        "burst_seconds": part["burst_seconds"],
        "opened": part["opened"],
        "refused": part["refused"],
        "reset_before_head": part["reset_before_head"],
        "not_200": part["not_200"],
        "completed_ratio": round(part["completed"] / clients, 4),
        # every event of its video, for Kinora (a stream opened without Last-Event-ID
        # gets the video's history); the peers' streams miss what came before them
        "delivered_ratio": round(part["events"] / (clients * per_video), 4),
        "all_open_seconds": part["all_open_seconds"],
        "events_after_head": int(latencies.size),
        "events_after_head_per_stream": round(latencies.size / max(1, expected_after_head), 1),
        **percentiles_ms(latencies),
        "server_warnings": len(warnings),
        "first_warnings": sorted({w[:200] for w in warnings})[:3],
        "kernel": {k: kernel_after.get(k, 0) - v for k, v in kernel_before.items()},
        **({"profile_self_time": frames} if frames else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10000)
    parser.add_argument("--seconds", type=float, default=2.5, help="the burst's length")
    parser.add_argument("--videos", type=int, default=10)
    parser.add_argument("--rate", type=float, default=100, help="events/s over all videos")
    parser.add_argument("--events", type=float, default=8.0, help="seconds of events")
    parser.add_argument(
        "--servers", nargs="+", default=["kinora", "kinora-api-token", "broadcaster", "floor"]
    )
    parser.add_argument(
        "--profile", type=Path, help="sample each server with py-spy; stacks in this folder"
    )
    args = parser.parse_args()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    runs = []
    with world() as w:
        for name in args.servers:
            run = run_burst(
                w, name, clients=args.clients, seconds=args.seconds, videos=args.videos,
                rate=args.rate, events=args.events, profile=args.profile,
            )  # fmt: skip
            if name in BEFORE and args.clients == 10000:
                run["before"] = BEFORE[name]
            runs.append(run)
    floor = next((r for r in runs if r["server"] == "floor"), None)
    for run in runs:  # the distance to the floor, in the same run
        if floor is not None and run is not floor:
            run["vs_floor"] = {
                "reset_before_head": run["reset_before_head"] - floor["reset_before_head"],
                "all_open_seconds": round(
                    run["all_open_seconds"] / max(floor["all_open_seconds"], 1e-9), 2
                ),
                "p99_ms": round(run["p99_ms"] / floor["p99_ms"], 2)
                if run["p99_ms"] and floor["p99_ms"]
                else None,
            }
    print(json.dumps({"benchmark": "burst", "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
