"""Each benchmark, run small (seconds, tiny N), so `make bench` keeps working. These
check that the benchmarks run and what they report is sound: every event delivered
for Kinora's server; no timing is asserted (the figures are for `make bench`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[1]


def bench(name: str, *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout)
    assert result["benchmark"] == name
    return result


def assert_sound(run: dict[str, Any], watchers: int) -> None:
    assert run["connected"] == watchers
    assert run["delivered_ratio"] == 1.0
    assert run["completed_streams"] == watchers
    assert 0 < run["p50_ms"] <= run["p99_ms"] <= run["max_ms"]
    assert run["server_redis_connections"] <= 3


def test_fanout() -> None:
    result = bench(
        "fanout", "--watchers", "200", "--events", "3", "--rate", "50",
        "--peers", "naive", "--peer-timeout", "10",
    )  # fmt: skip
    assert [(r["videos"], r["events_per_video"]) for r in result["runs"]] == [(2, 3), (1, 6)]
    for run in result["runs"]:
        assert_sound(run, 200)
        assert run["cpu_us_per_delivery"] > 0
    goal = result["goal"]  # the idle connection's memory, beside the aim
    assert goal["idle_kb_per_connection"]["kinora"] > 0
    assert goal["reached"] == (goal["idle_kb_per_connection"]["kinora"] <= goal["aim_kb"])
    naive = result["hot_video_peers"]["naive"]  # in the same run, as ratios to Kinora's
    assert naive["connected"] == 200
    assert set(naive["vs_kinora"]) == {
        "p50_ms",
        "p99_ms",
        "rss_per_connection_kb",
        "server_redis_connections",
    }


def test_storm() -> None:
    result = bench(
        "storm", "--clients", "60", "--videos", "3", "--history", "6", "--live", "2",
        "--servers", "kinora", "kinora-api-token", "naive",  # broadcaster may lose a
        # `complete`: a 15 s wait
    )  # fmt: skip
    assert [r["server"] for r in result["runs"]] == ["kinora", "kinora-api-token", "naive"]
    for kinora in result["runs"][:2]:  # scoped tokens, then the user's API token
        assert kinora["streaming"] == 60  # every client back, with its missed events
        assert kinora["delivered_ratio"] == 1.0
        assert kinora["server_warnings"] == 0
        assert kinora["streams_per_s"] > 0
        assert result["goal"]["streams_per_s"][kinora["server"]] == kinora["streams_per_s"]


def test_burst() -> None:
    """A small burst: every stream opens (none reset), every event reaches Kinora's
    streams, the kernel's counters are read, and the floor's ratios are printed."""
    result = bench(
        "burst", "--clients", "200", "--seconds", "0.5", "--videos", "2", "--rate", "20",
        "--events", "2", "--servers", "kinora", "kinora-api-token", "floor",
    )  # fmt: skip
    assert [r["server"] for r in result["runs"]] == ["kinora", "kinora-api-token", "floor"]
    for kinora in result["runs"][:2]:
        assert kinora["opened"] == 200
        assert kinora["refused"] == kinora["reset_before_head"] == kinora["not_200"] == 0
        assert kinora["completed_ratio"] == 1.0
        assert kinora["delivered_ratio"] == 1.0
        assert kinora["server_warnings"] == 0
        assert "ListenOverflows" in kinora["kernel"]
        assert set(kinora["vs_floor"]) == {"reset_before_head", "all_open_seconds", "p99_ms"}


def test_kinora_under_granian_and_hypercorn() -> None:
    """Kinora's app as `kinora api` serves it, under the other ASGI servers the
    benchmarks measure beside uvicorn: every client back with its missed events."""
    result = bench(
        "storm", "--clients", "40", "--videos", "2", "--history", "6", "--live", "2",
        "--servers", "kinora-granian", "kinora-hypercorn",
    )  # fmt: skip
    for run in result["runs"]:
        assert run["streaming"] == 40, run
        assert run["delivered_ratio"] == 1.0
        assert run["server_warnings"] == 0


def test_http2() -> None:
    """Pages of streams over HTTP/2 (nginx in front with kinora-https.conf, and Kinora's
    app under granian speaking it itself) and over HTTP/1.1: every event on every
    stream, a page's streams on ONE connection over HTTP/2, one each over HTTP/1.1."""
    result = bench(
        "http2", "--pages", "3", "--streams", "4", "--events", "3", "--rate", "40",
        "--servers", "nginx-h2", "granian-h2", "kinora-h1",
    )  # fmt: skip
    ways = {run["way"]: run for run in result["runs"]}
    assert list(ways) == ["nginx-h2", "granian-h2", "kinora-h1"]
    for run in ways.values():
        assert run["opened"] == 12, run
        assert run["delivered_ratio"] == 1.0
        assert run["completed_streams"] == 12
    assert ways["nginx-h2"]["client_connections"] == ways["granian-h2"]["client_connections"] == 3
    assert ways["kinora-h1"]["client_connections"] == 12
    assert set(ways["nginx-h2"]["vs_kinora_h1"]) == {
        "open_seconds", "p50_ms", "p99_ms", "cpu_us_per_delivery", "rss_per_stream_kb",
    }  # fmt: skip


def test_cores() -> None:
    result = bench(
        "cores", "--watchers", "40", "--videos", "2", "--events", "5", "--rate", "50",
        "--repeat", "1",
    )  # fmt: skip
    assert [r["workers"] for r in result["runs"]] == [1, 2]
    for run in result["runs"]:
        assert run["delivered_ratio"] == 1.0
        assert run["api_cpu_us_per_delivered_event"] > 0
        assert run["redis_connections_per_process"] <= 3
        assert run["submitted"] == 20
        assert run["redis_connections_per_process_after_submits"] <= 3
        assert run["cpu_per_event_vs_one"] > 0


def test_latency() -> None:
    result = bench("latency", "--watchers", "1", "10", "--events", "20", "--rate", "50")
    assert [r["watchers"] for r in result["runs"]] == [1, 10]
    for run in result["runs"]:
        assert_sound(run, run["watchers"])


def test_baseline() -> None:
    result = bench(
        "baseline", "--watchers", "20", "--videos", "2", "--seconds", "0.5", "--fast-rate", "0",
        "--timeout", "6",  # the other two servers may never end a stream: they lose events
    )  # fmt: skip
    [scenario] = result["scenarios"]
    servers = [r["server"] for r in scenario["runs"]]
    assert servers == ["kinora", "naive", "broadcaster", "floor"]
    assert_sound(scenario["runs"][0], 20)
    assert_sound(scenario["runs"][3], 20)  # the floor loses nothing either
    for other in ("naive_vs_kinora", "broadcaster_vs_kinora", "floor_vs_kinora"):
        assert scenario[other]["p99_ms"] is not None


def test_publish() -> None:
    result = bench("publish", "--events", "200")
    step, floor, naive = result["runs"]
    assert step["publisher"] == "SSELogger.step"
    assert step["events"] == 200
    assert naive["publisher"].startswith("asyncio.run()")
    for run in (step, floor, naive):
        assert run["p50_us"] > 0
        assert run["events_per_s"] > 0


def test_replay() -> None:
    result = bench(
        "replay", "--connections", "10", "--baseline-connections", "3", "--events", "450",
        "--event-bytes", "200", "--stall", "1",
    )  # fmt: skip
    for run in (result["paged"], result["baseline_one_write"]):
        assert run["every_event_to_every_client"], run
    assert result["paged"]["page"] == 200
    assert result["baseline_one_write"]["page"] == 450


def test_recovery() -> None:
    result = bench("recovery", "--trials", "1", "--lease-seconds", "2")
    assert [r["fault"] for r in result["runs"]] == ["kill_pool", "kill_worker"]
    for run in result["runs"]:
        assert run["status"] == "completed", run
        assert run["problems"] == [], run
        assert run["seconds_to_next_event"] <= run["seconds_to_resume"]


def test_many() -> None:
    result = bench("many", "--clients", "40", "--jobs", "4", "--events", "3", "--rate", "80")
    for shape, connections in (("single", 160), ("many", 40)):
        run = result[shape]
        assert run["connections"] == connections
        assert run["connected"] == connections
        assert run["delivered_ratio"] == 1.0
        assert run["completed_streams"] == connections
    assert set(result["many_vs_single"]) == {
        "p50_ms", "p99_ms", "cpu_us_per_delivery", "rss_per_client_kb", "connections",
    }  # fmt: skip


def test_drain() -> None:
    result = bench("drain", "--streams", "60", "--drain", "1")
    for run in (result["baseline"], result["drain"]):
        assert run["streams"] == 60
        assert run["ended_with_a_retry"] == 60  # every stream says goodbye
        assert run["ended_cleanly"] == 60  # a complete chunked body, never a reset
        assert 0 <= run["first_s"] <= run["median_s"] <= run["last_s"]
    assert result["peak_vs_baseline"] > 0
