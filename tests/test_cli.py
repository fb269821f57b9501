"""The `kinora` command as users run it: `kinora up` from start to Ctrl-C, and
`kinora users create`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from kinora.embedded import free_port
from tests.conftest import wait_for
from tests.helpers import assert_whole_generation, events_of, read_stream

pytestmark = pytest.mark.slow


def clean_env(tmp_path: Path) -> dict[str, str]:
    """As on a fresh machine: no REDIS_URL or DATABASE_URL, state under tmp_path/var."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "REDIS_URL",
            "DATABASE_URL",
            "KINORA_VAR_DIR",
            "SECRET_KEY",
            "PROMETHEUS_MULTIPROC_DIR",
        )
    }
    env["MOCK_STEP_SECONDS"] = "0.2"
    return env


def test_kinora_up_runs_everything_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    up = subprocess.Popen(
        [sys.executable, "-m", "kinora", "up", "--port", str(port)],
        cwd=tmp_path,
        env=clean_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines: list[str] = []

    def read() -> None:
        assert up.stdout is not None
        for line in up.stdout:
            lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not any(line.startswith("Token: ") for line in lines):
            assert up.poll() is None, "\n".join(lines)
            assert time.monotonic() < deadline, "no Token line within 60 s"
            time.sleep(0.1)
        token = next(line for line in lines if line.startswith("Token: "))[7:]
        assert f"Open http://127.0.0.1:{port}/?token={token}" in lines

        children = psutil.Process(up.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        assert "redis-server" in names
        assert "worker" in names
        assert "api" in names
        # the embedded Redis listens on loopback only
        redis_proc = next(c for c in children if "redis-server" in c.name())
        listening = [c for c in redis_proc.net_connections() if c.status == "LISTEN"]
        assert listening
        assert all(c.laddr.ip == "127.0.0.1" for c in listening)
        assert (tmp_path / "var" / "kinora.db").exists()

        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200
        created = httpx.post(
            f"{base}/api/v1/videos/generate",
            json={"prompt": "A windmill turning in the evening light"},
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        ).json()
        status, stream = read_stream(created["stream_url"])
        assert status == 200
        assert_whole_generation(events_of(stream))
        # One scrape of the API shows the worker's task too: they share metric files.
        wait_for(
            "the worker's task in the API's /metrics",
            lambda: (
                'kinora_tasks_total{outcome="completed"} 1.0'
                in httpx.get(f"{base}/metrics", timeout=5).text
            ),
            timeout=10,
        )

        started = time.monotonic()
        up.send_signal(signal.SIGTERM)
        assert up.wait(15) == 0
        assert time.monotonic() - started < 10
        _gone, alive = psutil.wait_procs(children, timeout=2)
        assert alive == [], [p.cmdline() for p in alive]
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(5)
        reader.join(5)
        assert up.stdout is not None
        up.stdout.close()

    # A second start reuses the demo user and its token.
    again = subprocess.Popen(
        [sys.executable, "-m", "kinora", "up", "--port", str(free_port())],
        cwd=tmp_path,
        env=clean_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert again.stdout is not None
        for line in again.stdout:
            if line.startswith("Token: "):
                assert line.strip() == f"Token: {token}"
                break
        again.send_signal(signal.SIGINT)  # Ctrl-C
        assert again.wait(15) == 0
    finally:
        if again.poll() is None:
            again.kill()
            again.wait(5)
        assert again.stdout is not None
        again.stdout.close()


def test_users_create_prints_the_token_last(
    tmp_path: Path, environment: dict[str, str], stack: object
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kinora", "users", "create", "cli@test.kinora", "--credits", "300"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    token = result.stdout.strip().splitlines()[-1]
    assert token.startswith("kin_")
    from tests.conftest import Stack

    assert isinstance(stack, Stack)
    with httpx.Client(base_url=stack.base_url, timeout=10) as client:
        response = client.get("/api/v1/videos", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200
    assert response.json()["total"] == 0

    duplicate = subprocess.run(
        [sys.executable, "-m", "kinora", "users", "create", "cli@test.kinora"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert duplicate.returncode != 0
    assert "exists already" in duplicate.stderr
