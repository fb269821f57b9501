"""Latency from `SSELogger.step()` in a worker process to the event parsed by an SSE
client, through Redis, the API's StreamHub and sse-starlette: p50/p90/p99/max with
1, 100 and 1,000 watchers of one video, events at a steady rate.

    python -m bench.latency [--watchers 1 100 1000] [--rate 100] [--events 500]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json

from bench.harness import run_load, start_server, world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--watchers", type=int, nargs="+", default=[1, 100, 1000])
    parser.add_argument("--rate", type=float, default=100.0, help="events per second")
    parser.add_argument("--events", type=int, default=500)
    args = parser.parse_args()
    with world() as w:
        server = start_server("kinora", w)
        try:
            runs = [
                run_load(
                    w,
                    server,
                    watchers=n,
                    videos=1,
                    rate=args.rate,
                    per_video=args.events,
                    loaders=1 if n < 100 else 2,
                    settle=0.5,
                )
                for n in args.watchers
            ]
        finally:
            server.stop()
    print(json.dumps({"benchmark": "latency", "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
