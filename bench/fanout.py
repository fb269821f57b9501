"""Fan-out: many concurrent SSE connections to one API process (one uvicorn worker),
spread over many videos and all on one (a hot video); events at a fixed aggregate rate.

    python -m bench.fanout [--watchers 1000 5000 10000] [--rate 100] [--events 20]
                           [--peers broadcaster naive]

Each watcher count runs twice: over watchers/100 videos with `--events` each, then all
on ONE video with the same events in all (as long a run, at the same rate). The hot
video at the largest count runs against the peers too (Kinora's app under granian
and under hypercorn, sse-starlette + broadcaster, the naive design, and the floor:
Kinora's design with nothing else), in the same run, each figure also as a ratio to
Kinora's.

Prints one JSON object: per run, delivered/expected (must be 1.0 for Kinora), latency
percentiles, server RSS per connection, the server's CPU per delivery while events
flow, and the Redis connections the server holds.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from bench.baseline import ratios
from bench.harness import run_load, start_server, world

# The aim: the memory of an idle connection at 10,000; and the last round's
# figures on the machine that measured them (main at f55b5b7: two runs; the floor 9.5).
GOAL_IDLE_KB = 16.0
BEFORE_IDLE_KB = {"kinora": [21.6, 22.3], "floor": [9.5]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--watchers", type=int, nargs="+", default=[1000, 5000, 10000])
    parser.add_argument("--rate", type=float, default=100.0, help="events per second, in all")
    parser.add_argument("--events", type=int, default=20, help="events per video, spread")
    parser.add_argument("--loaders", type=int, default=2)
    parser.add_argument(
        "--peers",
        nargs="*",
        default=["kinora-granian", "kinora-hypercorn", "broadcaster", "naive", "floor"],
    )
    parser.add_argument(
        "--peer-timeout", type=float, default=60.0,
        help="seconds a peer's clients wait for a `complete` that may never come",
    )  # fmt: skip
    args = parser.parse_args()
    runs: list[dict[str, Any]] = []
    hot_peers: dict[str, Any] = {}
    with world() as w:
        for n in args.watchers:
            spread = max(1, n // 100)
            for videos in (spread, 1):
                per_video = args.events * spread // videos  # the same events in all
                names = ["kinora"]
                if videos == 1 and n == max(args.watchers):
                    names += args.peers
                ours: dict[str, Any] = {}
                for name in names:
                    # A fresh server each run: its RSS before and after the connections
                    # gives the memory per connection.
                    server = start_server(name, w)
                    try:
                        run = run_load(
                            w, server, watchers=n, videos=videos, rate=args.rate,
                            per_video=per_video, loaders=args.loaders,
                            **({} if name == "kinora" else {"timeout": args.peer_timeout}),
                        )  # fmt: skip
                    finally:
                        server.stop()
                    if name == "kinora":
                        ours = run
                        runs.append(run)
                    else:
                        hot_peers[name] = {**run, "vs_kinora": ratios(ours, run)}
    biggest = [r for r in runs if r["watchers"] == max(args.watchers)]
    goal: dict[str, Any] = {}
    if biggest:
        kb = {"kinora": min(r["rss_per_connection_kb"] for r in biggest)}
        kb.update({name: run["rss_per_connection_kb"] for name, run in hot_peers.items()})
        goal = {
            "watchers": max(args.watchers),
            "idle_kb_per_connection": kb,
            "vs_floor": {n: round(v / kb["floor"], 2) for n, v in kb.items()}
            if "floor" in kb
            else None,
            "aim_kb": GOAL_IDLE_KB,
            "reached": kb["kinora"] <= GOAL_IDLE_KB,
            "before": BEFORE_IDLE_KB if max(args.watchers) == 10000 else None,
        }
    print(
        json.dumps(
            {"benchmark": "fanout", "goal": goal, "runs": runs, "hot_video_peers": hot_peers},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
