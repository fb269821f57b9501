"""Redis's CPU per delivered event: one server against a three-shard Redis Cluster, in
the same run.

Every topology carries the same load: `--publishers` processes publish `--events`
events over `--videos` videos through Kinora's publishing script (what SSELogger
sends), as fast as one call at a time goes; `--subscribers` processes (an API process
each) subscribe to every video as the hub does and count what arrives. Measured: the
CPU time of the Redis servers while the events go through, per delivered event, in
all and on the busiest node, and the publishing rate.

- `server`: one Redis server, PUBLISH (Kinora on `redis://`).
- `cluster`: three primaries, each video's keys and channel in one slot, SPUBLISH on
  the shard that owns it, the subscribers SSUBSCRIBEd per shard (Kinora on
  `redis+cluster://`: kinora.streaming.shards).
- `cluster_classic`: the same cluster with classic PUBLISH and SUBSCRIBE, which a
  cluster copies to every node: the baseline that sharded pub/sub replaces.

    python -m bench.shards [--events 30000] [--videos 120] [--subscribers 2] [--publishers 2]

Prints one JSON object: each topology's figures and the ratios to `server`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import tempfile
import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

import psutil
import redis.asyncio as aioredis
import uvloop

from kinora.streaming import connect, keys
from kinora.streaming.events import PUBLISH_LUA, PUBLISH_SHA, encode_body, script_args
from kinora.streaming.settings import Retention
from kinora.streaming.shards import Shards
from tests.utils.cluster import ClusterSet, plain_server

TOPOLOGIES = ("server", "cluster", "cluster_classic")


def channels(videos: int) -> list[bytes]:
    return [keys.video(v).channel.encode() for v in range(1, videos + 1)]


def subscriber(
    url: str, how: str, videos: int, expected: int, ready: MpEvent, results: Queue[Any]
) -> None:
    async def run() -> int:
        count = 0
        confirmed = 0
        done = asyncio.Event()

        def deliver(message: dict[str, Any]) -> None:
            nonlocal count, confirmed
            if message["type"] in ("message", "smessage"):
                count += 1
                if count >= expected:
                    done.set()
            elif message["type"] in ("subscribe", "ssubscribe"):
                confirmed += 1
                if confirmed == videos:
                    ready.set()

        names = channels(videos)
        where = connect.topology(url)
        if how == "cluster":
            cluster = aioredis.RedisCluster(**where.cluster_kwargs())
            shards = Shards(cluster, deliver)
            await shards.start()
            await shards.subscribe(*names)
            try:
                async with asyncio.timeout(120):
                    await done.wait()
            finally:
                await shards.stop()
                await cluster.aclose()
            return count
        if where.cluster:
            host, port = where.nodes[0]
            client = aioredis.Redis(host=host, port=port)
        else:
            client = aioredis.Redis.from_url(url)
        pubsub = client.pubsub()
        await pubsub.subscribe(*names)
        deadline = time.monotonic() + 120
        while not done.is_set() and time.monotonic() < deadline:
            message = await pubsub.get_message(timeout=1.0)
            if message is not None:
                deliver(message)
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await client.aclose()
        return count

    uvloop.install()
    results.put(("subscriber", asyncio.run(run())))


def publisher(
    url: str, sharded: bool, videos: range, events: int, start: MpEvent, results: Queue[Any]
) -> None:
    client = connect.sync_redis(url)
    client.script_load(PUBLISH_LUA)
    retention = Retention()
    bodies = {
        v: encode_body(keys.video(v), "progress", "Generating", {"progress": 50}) for v in videos
    }
    start.wait(60)
    began = time.perf_counter()
    sent = 0
    while sent < events:
        for v in videos:
            key = keys.video(v)
            names, args = script_args(key, bodies[v], 0, False, retention, sharded=sharded)
            client.evalsha(PUBLISH_SHA, len(names), *names, *args)
            sent += 1
            if sent >= events:
                break
    results.put(("publisher", (sent, time.perf_counter() - began)))


def cpu(pids: list[int]) -> dict[int, float]:
    found = {}
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        found[pid] = times.user + times.system
    return found


def measure(url: str, how: str, pids: list[int], args: argparse.Namespace) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    results: Queue[Any] = context.Queue()
    start = context.Event()
    sharded = how == "cluster"
    readies = [context.Event() for _ in range(args.subscribers)]
    subs = [
        context.Process(
            target=subscriber, args=(url, how, args.videos, args.events, ready, results)
        )
        for ready in readies
    ]
    for process in subs:
        process.start()
    for ready in readies:
        assert ready.wait(60), "a subscriber did not subscribe"
    share = args.events // args.publishers
    slices = [range(1 + i, args.videos + 1, args.publishers) for i in range(args.publishers)]
    pubs = [
        context.Process(target=publisher, args=(url, sharded, videos, share, start, results))
        for videos in slices
    ]
    for process in pubs:
        process.start()
    time.sleep(1.0)  # the publishers connected and loaded the script
    before = cpu(pids)
    began = time.perf_counter()
    start.set()
    got = [results.get(timeout=180) for _ in range(len(subs) + len(pubs))]
    elapsed = time.perf_counter() - began
    after = cpu(pids)
    for process in [*subs, *pubs]:
        process.join(30)
    delivered = sum(value for kind, value in got if kind == "subscriber")
    published = sum(value[0] for kind, value in got if kind == "publisher")
    spent = {pid: after[pid] - before[pid] for pid in pids}
    total = sum(spent.values())
    return {
        "events": published,
        "delivered": delivered,
        "delivery": round(delivered / (published * args.subscribers), 4),
        "seconds": round(elapsed, 2),
        "events_per_s": round(published / elapsed),
        "redis_cpu_us_per_delivery": round(total / delivered * 1e6, 2),
        "busiest_node_cpu_us_per_delivery": round(max(spent.values()) / delivered * 1e6, 2),
        "nodes_cpu_s": [round(s, 2) for s in sorted(spent.values(), reverse=True)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=30_000)
    parser.add_argument("--videos", type=int, default=120)
    parser.add_argument("--subscribers", type=int, default=2)
    parser.add_argument("--publishers", type=int, default=2)
    args = parser.parse_args()
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="kinora-bench-shards-") as tmp:
        root = Path(tmp)
        with plain_server(root) as (url, server):
            runs["server"] = measure(url, "server", [server.pid], args)
        for how in ("cluster", "cluster_classic"):
            cluster = ClusterSet(root / how, shards=3).start()
            try:
                pids = [p.pid for p in cluster.servers.values()]
                runs[how] = measure(cluster.url, how, pids, args)
            finally:
                cluster.stop()
    base = runs["server"]
    compared = ("redis_cpu_us_per_delivery", "busiest_node_cpu_us_per_delivery", "events_per_s")
    vs = {
        how: {k: round(runs[how][k] / base[k], 2) for k in compared}
        for how in ("cluster", "cluster_classic")
    }
    print(json.dumps({"benchmark": "shards", **runs, "vs_server": vs}, indent=2))


if __name__ == "__main__":
    main()
