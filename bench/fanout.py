"""Fan-out: many concurrent SSE connections to one API process (one uvicorn worker),
spread over many videos and all on one; events at a fixed aggregate rate.

    python -m bench.fanout [--watchers 1000 5000 10000] [--rate 100] [--events 20]

Prints one JSON object: per scenario, delivered/expected (must be 1.0), latency
percentiles, server RSS per connection and the Redis connections the API holds.
"""

from __future__ import annotations

import argparse
import json

from bench.harness import run_load, start_server, world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--watchers", type=int, nargs="+", default=[1000, 5000, 10000])
    parser.add_argument("--rate", type=float, default=100.0, help="events per second, in all")
    parser.add_argument("--events", type=int, default=20, help="events per video")
    parser.add_argument("--loaders", type=int, default=2)
    args = parser.parse_args()
    runs = []
    with world() as w:
        for n in args.watchers:
            for videos in (max(1, n // 100), 1):
                # A fresh server each run: its RSS before and after the connections
                # gives the memory per connection.
                server = start_server("kinora", w)
                try:
                    run = run_load(
                        w, server, watchers=n, videos=videos, rate=args.rate,
                        per_video=args.events if videos > 1 else args.events * 5,
                        loaders=args.loaders,
                    )  # fmt: skip
                    runs.append(run)
                finally:
                    server.stop()
    print(json.dumps({"benchmark": "fanout", "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
