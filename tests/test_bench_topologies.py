"""The benchmarks of Redis topologies and of a rolling restart, run small (seconds, tiny
N), so `make bench` keeps working: every event delivered, none lost or repeated; no
timing is asserted (the figures are for `make bench`). (Beside tests/test_bench.py,
in the other half of the end-to-end tier.)"""

from __future__ import annotations

import pytest

from tests.test_bench import bench

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_shards() -> None:
    result = bench("shards", "--events", "2000", "--videos", "30")
    for how in ("server", "cluster", "cluster_classic"):
        run = result[how]
        assert run["events"] == 2000
        assert run["delivery"] == 1.0  # every subscriber got every event
        assert run["redis_cpu_us_per_delivery"] >= run["busiest_node_cpu_us_per_delivery"]
    assert len(result["cluster"]["nodes_cpu_s"]) == 3
    assert set(result["vs_server"]) == {"cluster", "cluster_classic"}


def test_rolling() -> None:
    result = bench("rolling", "--clients", "40", "--rate", "10", "--drain", "1")
    for run in (result["baseline"], result["drain"]):
        assert run["clients"] == 40
        assert run["events_each"] > 10
        assert run["clients_with_every_event_once"] == 40  # none lost, none repeated
        assert (run["lost"], run["repeated"]) == (0, 0)
        assert len(run["restarts"]) == 2
        assert all(r["reconnects"] > 0 for r in run["restarts"])  # the restarts moved them
    assert result["peak_vs_baseline"] > 0
