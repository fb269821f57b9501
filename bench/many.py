"""One connection for many jobs against one stream per job, in the same run: every
client follows the same `--jobs` videos, either on `--jobs` streams of its own
(`GET /api/v1/videos/{id}/stream`) or on ONE many-jobs stream (`GET /api/v1/stream?
video=…`); events at a fixed aggregate rate over the videos.

    python -m bench.many [--clients 500] [--jobs 8] [--rate 200] [--events 20]

Prints one JSON object: each run's delivery (must be 1.0), latency percentiles, the
server's CPU per delivered event and memory per client, and the many-jobs run's
figures as ratios to the single streams' (`many_vs_single`).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from bench.harness import run_load, start_server, world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--jobs", type=int, default=8, help="videos each client follows")
    parser.add_argument("--rate", type=float, default=200.0, help="events per second, in all")
    parser.add_argument("--events", type=int, default=20, help="events per video")
    parser.add_argument("--loaders", type=int, default=2)
    args = parser.parse_args()
    runs: dict[str, dict[str, Any]] = {}
    with world() as w:
        for shape in ("single", "many"):
            server = start_server("kinora", w)  # a fresh server: its own RSS per client
            try:
                many = args.jobs if shape == "many" else 0
                run = run_load(
                    w, server,
                    watchers=args.clients * (1 if many else args.jobs),
                    videos=args.jobs, rate=args.rate, per_video=args.events,
                    loaders=args.loaders, many=many,
                )  # fmt: skip
            finally:
                server.stop()
            run["clients"] = args.clients
            run["connections"] = run.pop("watchers")
            run["rss_per_client_kb"] = round(
                run["rss_per_connection_kb"] * run["connections"] / args.clients, 1
            )
            runs[shape] = run
    single, many_run = runs["single"], runs["many"]
    compared = ("p50_ms", "p99_ms", "cpu_us_per_delivery", "rss_per_client_kb", "connections")
    vs = {k: round(many_run[k] / single[k], 2) for k in compared if single.get(k)}
    print(json.dumps({"benchmark": "many", **runs, "many_vs_single": vs}, indent=2))


if __name__ == "__main__":
    main()
