"""Replay memory: many clients replay one long history at once and read nothing
(stalled phones, a reconnect storm behind a slow network), then read it all.

    python -m bench.replay [--connections 2000] [--events 6000] [--event-bytes 2000]

The API is run twice in one run: with pages of HISTORY_PAGE_SIZE (200, the default)
and, as the baseline, with one page as large as the history (every event after
Last-Event-ID in one write, as before paging; fewer connections, or it would take
the machine's memory). Prints one JSON object: the API's RSS per stalled connection
for each, and whether every client then received every event (resuming with
Last-Event-ID, as EventSource does, when the server ended a response early).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from bench.harness import World, start_server, world
from kinora.streaming import keys


async def stalled_then_read(
    port: int, path: str, count: int, events: int, stall: float, rss: Any
) -> dict[str, Any]:
    """Open `count` streams that read nothing for `stall` seconds; measure; then read."""
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nLast-Event-ID: 0\r\n"
        "Accept: text/event-stream\r\n\r\n"
    ).encode()
    opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**16)
        writer.write(request)
        opened.append((reader, writer))
    await asyncio.sleep(stall)  # the server writes until every socket is full
    stalled_rss = rss()

    reconnects = 0

    async def read_all(reader: asyncio.StreamReader) -> int:
        """Every event, as EventSource reads it: a response that ends early (the
        server ended it with a `retry:`) is resumed with Last-Event-ID."""
        nonlocal reconnects
        seen = 0
        async with asyncio.timeout(420):
            while True:
                line = await reader.readline()
                if not line:
                    if seen >= events:
                        return seen
                    reconnects += 1
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.write(request.replace(b"Last-Event-ID: 0", b"Last-Event-ID: %d" % seen))
                    continue
                if line.startswith(b"id: "):
                    seen = int(line[4:])
                    if seen == events:
                        return seen

    started = time.monotonic()
    got = await asyncio.gather(*(read_all(r) for r, _ in opened), return_exceptions=True)
    for _, writer in opened:
        writer.close()
    whole = sum(1 for g in got if g == events)
    return {
        "connections": count,
        "stalled_rss_bytes": stalled_rss,
        "every_event_to_every_client": whole == count,
        "clients_with_every_event": whole,
        "read_all_seconds": round(time.monotonic() - started, 1),
        "resumed_with_last_event_id": reconnects,
    }


def history(w: World, events: int, size: int) -> int:
    from kinora.streaming.logger import SSELogger

    (video,) = w.videos(1)
    log = SSELogger(keys.video(video))
    for i in range(events - 1):
        log.log(f"event {i}", payload="x" * size)
    log.complete(status="cancelled")
    return video


def measure(
    w: World, page: int, connections: int, video: int, events: int, stall: float
) -> dict[str, Any]:
    w.env["HISTORY_PAGE_SIZE"] = str(page)
    w.env["MAX_STREAMS_PER_USER"] = "0"
    server = start_server("kinora", w)
    try:
        idle = server.rss()
        path = server.url_path(video, w.token)
        result = asyncio.run(
            stalled_then_read(server.port, path, connections, events, stall, server.rss)
        )
    finally:
        server.stop()
    per = (result["stalled_rss_bytes"] - idle) / connections
    return {
        "page": page,
        "idle_rss_bytes": idle,
        **result,
        "rss_per_stalled_connection_kb": round(per / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--baseline-connections", type=int, default=200)
    parser.add_argument("--events", type=int, default=6000)
    parser.add_argument("--event-bytes", type=int, default=2000)
    parser.add_argument("--stall", type=float, default=10.0, help="seconds read nothing")
    args = parser.parse_args()
    with world() as w:
        video = history(w, args.events, args.event_bytes)
        paged = measure(w, 200, args.connections, video, args.events, args.stall)
        whole = measure(w, args.events, args.baseline_connections, video, args.events, args.stall)
    ratio = whole["rss_per_stalled_connection_kb"] / max(paged["rss_per_stalled_connection_kb"], 1)
    print(
        json.dumps(
            {
                "benchmark": "replay",
                "events": args.events,
                "event_bytes": args.event_bytes,
                "paged": paged,
                "baseline_one_write": whole,
                "baseline_over_paged_per_connection": round(ratio, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
