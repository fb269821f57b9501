"""The same SSE load against four servers in one run: Kinora's API, the naive
design of the original notes (`bench/naive_server.py`: one Redis pub/sub
subscription per client), the usual shared-subscriber recipe
(`bench/broadcaster_server.py`: sse-starlette + broadcaster) and the floor
(`bench/floor_server.py`: Kinora's design with nothing else, as a bare ASGI app).
Each figure of the other three is also given as a ratio to Kinora's, with each one's
delivered ratio.

    python -m bench.baseline [--watchers 1000 3000] [--rate 100] [--fast-rate 1000]

Scenarios: each watcher count over 10 videos at `--rate` events/s in all, and the
first watcher count at `--fast-rate` events/s. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from bench.harness import run_load, start_server, world

SERVERS = ("kinora", "naive", "broadcaster", "floor")
COMPARED = ("p50_ms", "p99_ms", "rss_per_connection_kb", "server_redis_connections")


def ratios(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, float | None]:
    """theirs / ours for each compared figure (above 1: Kinora is ahead)."""
    out: dict[str, float | None] = {}
    for key in COMPARED:
        a, b = ours.get(key), theirs.get(key)
        out[key] = round(b / a, 2) if a and b is not None else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--watchers", type=int, nargs="+", default=[1000, 3000])
    parser.add_argument("--videos", type=int, default=10)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--fast-rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=5.0, help="publishing time a run")
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for streams to end"
    )
    args = parser.parse_args()
    scenarios = [(n, args.rate) for n in args.watchers]
    if args.fast_rate:
        scenarios.append((args.watchers[0], args.fast_rate))
    results: list[dict[str, Any]] = []
    with world() as w:
        for watchers, rate in scenarios:
            runs: dict[str, dict[str, Any]] = {}
            for name in SERVERS:
                server = start_server(name, w)
                try:
                    runs[name] = run_load(
                        w, server, watchers=watchers, videos=args.videos, rate=rate,
                        per_video=max(2, round(rate * args.seconds / args.videos)),
                        timeout=args.timeout,
                    )  # fmt: skip
                finally:
                    server.stop()
            results.append(
                {
                    "watchers": watchers,
                    "videos": args.videos,
                    "events_per_s": rate,
                    "delivered_ratio": {n: r["delivered_ratio"] for n, r in runs.items()},
                    "naive_vs_kinora": ratios(runs["kinora"], runs["naive"]),
                    "broadcaster_vs_kinora": ratios(runs["kinora"], runs["broadcaster"]),
                    "floor_vs_kinora": ratios(runs["kinora"], runs["floor"]),
                    "runs": list(runs.values()),
                }
            )
    print(json.dumps({"benchmark": "baseline", "scenarios": results}, indent=2))


if __name__ == "__main__":
    main()
