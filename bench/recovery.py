"""Recovery at the default settings (README, Faults): how long a video waits after its
worker is killed, until its stream speaks again and until it resumes its model job.

    python -m bench.recovery [--trials 2]

Two faults, on the fault suite's cluster (Redis, SQLite, an API, two workers) with
LEASE_SECONDS and SWEEP_INTERVAL_SECONDS at their defaults (20 s and 5 s):
`kill_pool` SIGKILLs the pool process running the video (Celery hands the message
back at once; it waits out the dead claim), `kill_worker` the whole worker (another
worker's sweeper finds the expired claim). Prints one JSON object: seconds from the
kill to the video's next event and to "Resuming model job", per trial, and whether
every video completed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from tests.faults.chaos import SETTINGS, Cluster, Watcher, new_user, submit

DEFAULTS = {
    k: v
    for k, v in SETTINGS.items()
    if k not in ("LEASE_SECONDS", "SWEEP_INTERVAL_SECONDS", "STALE_PENDING_SECONDS")
} | {"MOCK_STEP_SECONDS": "1"}


def holder(cluster: Cluster, video: int) -> str | None:
    """The worker (by name) whose pool process holds the video's claim."""
    rows = cluster.sql("SELECT claimed_by FROM videos WHERE id = ?", video)
    owner = rows[0][0] if rows else None
    if not owner:
        return None
    pid = int(owner.split(":")[1])
    for name in ("worker-1", "worker-2"):
        pool = psutil.Process(cluster.processes[name].pid).children(recursive=True)
        if pid in {p.pid for p in pool}:
            return name
    return None


def trial(cluster: Cluster, fault: str, n: int) -> dict[str, Any]:
    token = new_user()
    problems: list[str] = []
    video = submit(cluster.base, token, f"Recovery {fault} {n}: a river at dusk", f"r{n}", problems)
    assert video is not None, problems
    watcher = Watcher(cluster.base, video, token, time.monotonic() + 180)
    watcher.start()
    deadline = time.monotonic() + 60
    name: str | None = None
    while time.monotonic() < deadline:
        rows = cluster.sql("SELECT model_job_id FROM videos WHERE id = ?", video)
        name = holder(cluster, video)
        if rows[0][0] and name:
            break
        time.sleep(0.1)
    status = cluster.sql("SELECT status FROM videos WHERE id = ?", video)[0][0]
    assert status == "processing", (
        f"video {video} is {status} before the fault could strike: a slower mock "
        "(--step-seconds) gives it time"
    )
    assert name is not None, f"no worker holds video {video} after 60 s"
    seen = len(watcher.events)
    if fault == "kill_pool":
        pool = psutil.Process(cluster.processes[name].pid).children(recursive=True)
        for process in pool:
            process.kill()
    else:
        cluster.kill(name, stay_down=True)  # until it is started again below
    killed = time.monotonic()
    while len(watcher.events) == seen and watcher.is_alive() and time.monotonic() < killed + 120:
        time.sleep(0.05)
    spoke = time.monotonic() - killed

    def resumed() -> bool:
        return any(e["message"].startswith("Resuming model job") for e in watcher.events[seen:])

    while not resumed() and watcher.is_alive() and time.monotonic() < killed + 120:
        time.sleep(0.05)
    resumed_after = time.monotonic() - killed
    if fault == "kill_worker":
        cluster.start(name)
    watcher.join(120)
    status = cluster.sql("SELECT status FROM videos WHERE id = ?", video)[0][0]
    return {
        "fault": fault,
        "seconds_to_next_event": round(spoke, 1),
        "seconds_to_resume": round(resumed_after, 1),
        "next_event": watcher.events[seen]["message"] if len(watcher.events) > seen else None,
        "status": status,
        "problems": problems + watcher.problems,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument(
        "--lease-seconds", type=float, help="instead of the default (a quick smoke run)"
    )
    parser.add_argument(
        "--step-seconds", type=float, default=1.0, help="the mock model's pause per update"
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kinora-recovery-"))
    settings = DEFAULTS | {"MOCK_STEP_SECONDS": str(args.step_seconds)}
    if args.lease_seconds:
        settings |= {"LEASE_SECONDS": str(args.lease_seconds), "SWEEP_INTERVAL_SECONDS": "1"}
    cluster = Cluster(root, settings)
    runs = []
    try:
        for n in range(args.trials):
            for fault in ("kill_pool", "kill_worker"):
                runs.append(trial(cluster, fault, n))
    finally:
        cluster.stop()
    named = f"LEASE_SECONDS={args.lease_seconds}" if args.lease_seconds else "defaults"
    print(json.dumps({"benchmark": "recovery", "settings": named, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
