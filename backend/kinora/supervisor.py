"""`kinora up`: every part of Kinora on one machine, started in order, stopped cleanly.

Each child runs in its own session (process group), so a Ctrl-C in the terminal
reaches only us and we stop the children in order: SIGTERM first, then SIGKILL of
their whole group (Celery's pool processes, uvicorn's) if they have not gone within
the grace period. Redis stops last, so the worker and the API can still publish.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

import httpx

from kinora.accounts import DuplicateUser, create_user, rotate_token, user_for_token
from kinora.config import METRICS_DIR_ENV, Settings, get_settings
from kinora.db import upgrade
from kinora.embedded import EmbeddedRedis

DEMO_EMAIL = "demo@kinora.local"
GRACE_SECONDS = 6.0  # then SIGKILL: all of it is gone well within CONTRACT's 10 s


class Stop(Exception):
    pass


def demo_token(settings: Settings) -> str:
    """The demo user's API token, created on first start and kept under var/ (0600)."""
    path = settings.var_dir / "demo-token"
    if path.exists():
        token = path.read_text().strip()
        if user_for_token(token) is not None:
            return token
    try:
        _user, token = create_user(DEMO_EMAIL, credits=settings.demo_credits, plan="pro")
    except DuplicateUser:
        rotated = rotate_token(DEMO_EMAIL)
        assert rotated is not None
        token = rotated
    path.write_text(token + "\n")
    path.chmod(0o600)
    return token


def spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`kinora <args>` as a child in its own process group."""
    return subprocess.Popen(
        [sys.executable, "-m", "kinora", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


def name(child: subprocess.Popen[bytes]) -> str:
    return f"kinora {child.args[3]!s}"  # type: ignore[index]


def wait_healthy(url: str, children: list[subprocess.Popen[bytes]], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in children:
            if child.poll() is not None:
                raise Stop(f"{name(child)} exited with code {child.returncode} at start")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise Stop(f"the API did not answer {url} within {timeout:.0f} s")


def stop_children(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        if child.poll() is None:
            child.terminate()
    deadline = time.monotonic() + GRACE_SECONDS
    for child in children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(max(0.0, deadline - time.monotonic()))
    for child in children:
        # The whole group: a worker's pool processes go with it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
        if child.poll() is None:
            child.wait(2)


def run_all(*, host: str, port: int, workers: int) -> int:
    settings = get_settings()
    var = settings.var_dir.resolve()
    var.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, KINORA_VAR_DIR=str(var), PYTHONUNBUFFERED="1")
    if METRICS_DIR_ENV not in env:
        # One directory of metric files for the API and the worker: the API's /metrics
        # shows the worker's task outcomes and model latency too.
        metrics_dir = var / "metrics" / "up"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        env[METRICS_DIR_ENV] = str(metrics_dir)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        raise Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    embedded: EmbeddedRedis | None = None
    children: list[subprocess.Popen[bytes]] = []
    code = 0
    try:
        if not settings.redis_url:
            embedded = EmbeddedRedis(Path(var) / "redis").start()
            env["REDIS_URL"] = embedded.url
            print(f"Redis: embedded at {embedded.url} (data in {var / 'redis'})", flush=True)
        upgrade()
        token = demo_token(settings)
        children.append(spawn(["worker", "--concurrency", str(workers)], env))
        children.append(spawn(["api", "--host", host, "--port", str(port)], env))
        base = f"http://{host}:{port}"
        wait_healthy(f"{base}/healthz", children)
        print(f"Open {base}/?token={token}", flush=True)
        print(f"Token: {token}", flush=True)
        while True:
            for child in children:
                if child.poll() is not None:
                    raise Stop(f"{name(child)} exited with code {child.returncode}")
            time.sleep(0.2)
    except Stop as reason:
        text = str(reason)
        code = 0 if text in ("SIGTERM", "SIGINT") else 1
        print(f"Stopping ({text})...", file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop_children(children)
        if embedded is not None:
            embedded.stop()
    return code
