"""Reconnect storm: an API process restarted, and all its clients come back at once
to this one, each with the Last-Event-ID it had.

    python -m bench.storm [--clients 10000] [--videos 10] [--history 20] [--live 5]

Every video has `history` events; every client reconnects with Last-Event-ID at
half of them (with the video's scoped token, as `stream_url` gives it; or, the
`kinora-api-token` run, with the user's API token) and must get
the rest, then `live` new events and `complete`. A connection refused or reset is
tried again after 0.5 s, as EventSource does. The clocks: until every client is
streaming again (has its missed events), and the streams opened per second. The
broadcaster, naive and floor servers run in the same run as peers: they have no
history, so for them "streaming again" is the response's head, and what they lose is
counted; `kinora-granian` and `kinora-hypercorn` are Kinora's app under those servers.

Prints one JSON object: per server, the seconds until every client streamed again,
streams per second, the server's CPU per stream opened (steadier from run to run than
the clock, on a machine whose cores the load generators share), connections refused
on the way, and delivered/expected.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import time
from multiprocessing.synchronize import Event as MpEvent
from typing import Any, cast

from bench.harness import (
    SERVED_BY,
    SPAWN,
    RawSSE,
    ServerLog,
    World,
    close_all,
    start_server,
    stream_path,
    within,
    world,
)
from kinora.streaming import keys

RETRY_SECONDS = 0.5
# The aim: streams opened per second by one process in a storm of 10,000.
GOAL_STREAMS_PER_S = 4000
# The last round's figures, at the defaults, on the machine that measured them (runs
# of main at f55b5b7, this round's start): streams/s, and the floor's in that run; the
# server's CPU per stream opened, and the floor's.
BEFORE: dict[str, dict[str, Any]] = {
    "kinora": {
        "streams_per_s": [2488, 2291, 2104, 2333], "floor": [4320, 4187, 6341, 5969],
        "cpu_us_per_stream": [438, 402], "floor_cpu_us_per_stream": [121, 140],
    },
    "kinora-api-token": {"streams_per_s": [2658], "floor": [4320]},
}  # fmt: skip
DRAIN_SECONDS = 15.0
HOST = "127.0.0.1"


class StormClient(RawSSE):
    """One client: its request, the events it still expects to catch up on, and when
    it had them; reconnected by `storm_process` when refused."""

    def __init__(self, request: bytes, catch_up: int, stats: dict[str, Any]) -> None:
        super().__init__(request)
        self.catch_up = catch_up  # events to receive before it counts as streaming
        self.stats = stats
        self.events = 0
        self.streaming: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.answered.add_done_callback(self._refused)

    def _refused(self, answered: asyncio.Future[bool]) -> None:
        if not answered.result():  # not a 200, or reset before the head came
            self.stats["refused"] += 1

    def lines(self, data: bytes) -> None:
        self.events += data.count(b"data: ")
        if self.events >= self.catch_up and not self.streaming.done():
            self.streaming.set_result(time.monotonic())


def storm_process(
    port: int,
    requests: list[bytes],
    catch_up: int,
    expected: int,
    go: MpEvent,
    streaming_flag: MpEvent,
    results: Any,
    timeout: float,
) -> None:
    """All of `requests` at once (each retried after RETRY_SECONDS while refused), then
    each read until `complete` or the timeout."""
    import uvloop

    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        stats: dict[str, Any] = {"refused": 0, "retries": 0}
        clients: list[StormClient] = []

        async def reconnect(request: bytes) -> float | None:
            while True:
                client = StormClient(request, catch_up, stats)
                try:
                    await loop.create_connection(functools.partial(lambda c: c, client), HOST, port)
                except OSError:
                    stats["refused"] += 1
                else:
                    ends: list[asyncio.Future[Any]] = [client.streaming, client.closed]
                    await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
                    if client.streaming.done():
                        clients.append(client)
                        return client.streaming.result()
                stats["retries"] += 1
                await asyncio.sleep(RETRY_SECONDS)

        go.wait(60)
        started = time.monotonic()
        times = await within(timeout, [reconnect(r) for r in requests]) or []
        streaming_flag.set()
        # The live events and `complete` follow within a second or two; a client still
        # open DRAIN_SECONDS later never gets them (a peer lost them).
        await close_all(clients, DRAIN_SECONDS)
        return {
            "started": started,
            "last_streaming": max((t for t in times if t is not None), default=None),
            "streaming": len(clients),
            "delivered": sum(min(c.events, expected) for c in clients),
            "refused": stats["refused"],
            "retries": stats["retries"],
        }

    results.put(uvloop.run(main()))


def publish(w: World, videos: list[int], count: int, step: int) -> None:
    from kinora.streaming.logger import SSELogger

    for video in videos:
        log = SSELogger(keys.video(video))
        for i in range(count):
            log.step(5, f"Processing video... {step + i}", progress=(step + i) % 100)


def complete(w: World, videos: list[int]) -> None:
    from kinora.streaming.logger import SSELogger

    for video in videos:
        SSELogger(keys.video(video)).complete()


def run_storm(
    w: World, name: str, *, clients: int, videos: int, history: int, live: int, loaders: int
) -> dict[str, Any]:
    ids = w.videos(videos)
    publish(w, ids, history, 0)
    resume_at = history // 2
    # `kinora-api-token`: Kinora, each client with the user's API token instead of the
    # video's scoped one.
    kind = "kinora" if name == "kinora-api-token" else name
    server_log = ServerLog(w, kind)
    server = start_server(kind, w)
    try:
        requests = []
        for i in range(clients):
            video = ids[i % videos]
            path = stream_path(name, server, w, video)
            requests.append(
                f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nLast-Event-ID: {resume_at}\r\n"
                "Accept: text/event-stream\r\n\r\n".encode()
            )
        catch_up = history - resume_at if kind == "kinora" or kind in SERVED_BY else 0
        expected = catch_up + live + 1
        go = SPAWN.Event()
        flags = [SPAWN.Event() for _ in range(loaders)]
        results = SPAWN.Queue()
        timeout = 120.0
        procs = [
            SPAWN.Process(
                target=storm_process,
                args=(server.port, requests[i::loaders], catch_up, expected, go, flags[i]),
                kwargs={"results": results, "timeout": timeout},
            )
            for i in range(loaders)
        ]
        for p in procs:
            p.start()
        time.sleep(1.0)  # the load generators up
        cpu_before = server.cpu_seconds()
        go.set()
        for flag in flags:
            flag.wait(timeout + 10)
        # The server's CPU for the storm (until every client streamed again): what a
        # stream costs to open, whatever else the machine's cores were doing meanwhile.
        storm_cpu = server.cpu_seconds() - cpu_before
        time.sleep(1.0)  # the last subscriptions confirmed, for the peers that need it
        publish(w, ids, live, history)
        complete(w, ids)
        parts = [results.get(timeout=timeout + 30) for _ in procs]
        for p in procs:
            p.join(30)
    finally:
        server.stop()
    # Refusals the server logged (503s while Redis seemed not to answer, errors).
    warnings = server_log.warnings()
    started = min(p["started"] for p in parts)
    lasts = [p["last_streaming"] for p in parts]
    seconds = None if None in lasts else max(cast(list[float], lasts)) - started
    streaming = sum(p["streaming"] for p in parts)
    return {
        "server": name,
        "clients": clients,
        "videos": videos,
        "streaming": streaming,
        "all_streaming_seconds": None if seconds is None else round(seconds, 2),
        "streams_per_s": None if not seconds else round(clients / seconds),
        "cpu_us_per_stream": round(storm_cpu / clients * 1e6, 1),
        "refused_or_reset": sum(p["refused"] for p in parts),
        "delivered_ratio": round(sum(p["delivered"] for p in parts) / (clients * expected), 4),
        "server_warnings": len(warnings),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10000)
    parser.add_argument("--videos", type=int, default=10)
    parser.add_argument("--history", type=int, default=20, help="events before the storm")
    parser.add_argument("--live", type=int, default=5, help="events after it")
    parser.add_argument("--loaders", type=int, default=2)
    parser.add_argument(
        "--servers",
        nargs="+",
        default=[
            "kinora",
            "kinora-api-token",
            "kinora-granian",
            "kinora-hypercorn",
            "broadcaster",
            "naive",
            "floor",
        ],
    )
    args = parser.parse_args()
    runs = []
    with world() as w:
        for name in args.servers:
            run = run_storm(
                w, name, clients=args.clients, videos=args.videos, history=args.history,
                live=args.live, loaders=args.loaders,
            )  # fmt: skip
            runs.append(run)
    kinora = next((r for r in runs if r["server"] == "kinora"), None)
    floor = next((r for r in runs if r["server"] == "floor"), None)
    for run in runs:
        if kinora and kinora["all_streaming_seconds"] and run["all_streaming_seconds"]:
            run["seconds_vs_kinora"] = round(
                run["all_streaming_seconds"] / kinora["all_streaming_seconds"], 2
            )
        if floor and floor["streams_per_s"] and run["streams_per_s"] and run is not floor:
            run["streams_vs_floor"] = round(run["streams_per_s"] / floor["streams_per_s"], 2)
            run["cpu_vs_floor"] = round(run["cpu_us_per_stream"] / floor["cpu_us_per_stream"], 2)
        if run["server"] in BEFORE and args.clients == 10000:
            run["before"] = BEFORE[run["server"]]
    goal = {
        "streams_per_s": {r["server"]: r["streams_per_s"] for r in runs},
        "aim": GOAL_STREAMS_PER_S,
        "reached": {
            r["server"]: bool(r["streams_per_s"] and r["streams_per_s"] >= GOAL_STREAMS_PER_S)
            for r in runs
            if r["server"].startswith("kinora")
        },
    }
    print(json.dumps({"benchmark": "storm", "goal": goal, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
