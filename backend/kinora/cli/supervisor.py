"""`kinora up`: every part of Kinora on one machine, started in order, stopped cleanly.

A child that crashes (the worker, the API, the embedded Redis) is started again,
with backoff, and a line says so; a crash loop stops everything. Each child runs in
its own session (process group), so a Ctrl-C in the terminal reaches only us and we
stop the children in order: SIGTERM first, then SIGKILL of
their whole group (Celery's pool processes, uvicorn's) if they have not gone within
the grace period. Redis stops last, so the worker and the API can still publish.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from kinora.cli.embedded import EmbeddedRedis
from kinora.core.config import METRICS_DIR_ENV, Settings, child_environment, get_settings
from kinora.core.db import upgrade
from kinora.core.lifetime import die_with_parent
from kinora.jobs import dispatch
from kinora.jobs.accounts import DuplicateUser, create_user, rotate_token, user_for_token

DEMO_EMAIL = "demo@kinora.local"
REDIS = "the embedded Redis"
GRACE_SECONDS = 6.0  # then SIGKILL: all of it is gone well within the 10 s README promises


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


def spawn(
    args: list[str], env: dict[str, str], death: int = signal.SIGTERM
) -> subprocess.Popen[bytes]:
    """`kinora <args>` as a child in its own process group, tied to our life."""
    return subprocess.Popen(
        [sys.executable, "-m", "kinora", *args], env=env, stdin=subprocess.DEVNULL,
        **tied(death),
    )  # fmt: skip


def tied(death: int = signal.SIGTERM) -> dict[str, Any]:
    """Popen's arguments for a child of `kinora up`: its own session (a Ctrl-C in the
    terminal reaches only us, and we stop the children in order), yet it dies with us
    whatever kills us (SIGKILL, a closed terminal's SIGHUP): the kernel sends it `death`
    when we are gone (core.lifetime), and it holds the var dir's lock (`VarLock`) until
    it and its own children have exited.

    The API and Redis get SIGTERM (the API's shutdown is bounded, and Redis saves);
    the workers get SIGKILL: with Redis stopping at the same instant, Celery's warm
    shutdown would wait for its broker for ever, and nobody is left to escalate. A
    worker killed is a fault Kinora recovers from (the claim's lease runs out and the
    video resumes), and its pool processes die with it (worker.celery_app)."""
    parent = os.getpid()

    def preexec() -> None:  # in the child, between fork and exec
        die_with_parent(death, parent)

    return {"start_new_session": True, "preexec_fn": preexec, "pass_fds": _held}


_held: tuple[int, ...] = ()  # the var dir lock's descriptor, passed to every child


class VarLock:
    """One `kinora up` per var dir: an exclusive lock on `<var>/kinora-up.lock`, held by
    the supervisor and every child it starts (the lock's descriptor is inherited), so a
    second `kinora up` refuses to start while any of them runs, and says which process
    took it. The kernel drops the lock when the last holder exits, however it exits."""

    def __init__(self, var: Path) -> None:
        self.path = var / "kinora-up.lock"
        self.fd = -1

    def __enter__(self) -> VarLock:
        global _held
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise Stop(
                f"another kinora up (pid {holder}) holds {self.path.parent}, or its "
                "children are still stopping: stop it first, or set KINORA_VAR_DIR to "
                "another directory"
            ) from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())
        _held = (self.fd,)
        return self

    def __exit__(self, *exc: object) -> None:
        global _held
        _held = ()
        os.close(self.fd)


# A child that crashes is started again after a pause that doubles with each crash in
# a row (0.5 s, 1 s, 2 s ... at most 10 s); this many crashes within CRASH_WINDOW
# seconds is a crash loop, and `kinora up` gives up rather than spin.
CRASH_LOOP = 5
CRASH_WINDOW = 60.0
MAX_BACKOFF = 10.0


class Child:
    """One supervised part: a `kinora` subcommand, or the embedded Redis."""

    def __init__(
        self,
        name: str,
        start: Callable[[], subprocess.Popen[bytes] | None],
    ) -> None:
        self.name = name
        self._start = start
        self.process: subprocess.Popen[bytes] | None = None
        self.crashes: list[float] = []
        self.restart_at: float | None = None

    def start(self) -> None:
        self.process = self._start()
        self.restart_at = None

    def exited(self) -> int | None:
        """The exit code if the child has gone (and no restart is pending)."""
        if self.process is None or self.restart_at is not None:
            return None
        return self.process.poll()

    def crashed(self, code: int) -> float:
        """Note a crash; returns the pause before the restart. Raises Stop on a loop."""
        now = time.monotonic()
        self.crashes = [t for t in self.crashes if now - t < CRASH_WINDOW] + [now]
        if len(self.crashes) >= CRASH_LOOP:
            raise Stop(
                f"{self.name} crashed {len(self.crashes)} times within "
                f"{CRASH_WINDOW:.0f} s (last exit code {code}): giving up"
            )
        pause = min(MAX_BACKOFF, 0.5 * 2.0 ** (len(self.crashes) - 1))
        self.restart_at = now + pause
        return pause


def wait_healthy(url: str, children: list[Child], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in children:
            code = child.exited()
            if code is not None:
                raise Stop(f"{child.name} exited with code {code} at start")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise Stop(f"the API did not answer {url} within {timeout:.0f} s")


def wait_worker(broker_url: str, children: list[Child], timeout: float = 30) -> None:
    """Until a worker answers a ping (its start-up lines are out by then); a slow one
    is not an error, only said so."""
    app = dispatch.make_celery(broker_url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for child in children:
                code = child.exited()
                if code is not None:
                    raise Stop(f"{child.name} exited with code {code} at start")
            if app.control.ping(timeout=0.5):
                return
        print(f"the worker has not answered in {timeout:.0f} s; still waiting for it", flush=True)
    finally:
        app.close()


def supervise(children: list[Child]) -> None:
    """Run until a signal: a child that exits is said so and started again, with
    backoff; a crash loop stops everything (Stop)."""
    while True:
        now = time.monotonic()
        for child in children:
            if child.restart_at is not None and now >= child.restart_at:
                try:
                    child.start()
                except Exception as exc:  # the embedded Redis did not come up
                    pause = child.crashed(-1)
                    print(f"{child.name} did not start ({exc}); again in {pause:g} s",
                          file=sys.stderr, flush=True)  # fmt: skip
                    continue
                print(f"{child.name} started again", file=sys.stderr, flush=True)
                continue
            code = child.exited()
            if code is not None:
                pause = child.crashed(code)
                print(
                    f"{child.name} exited with code {code}; starting it again in {pause:g} s",
                    file=sys.stderr,
                    flush=True,
                )
        time.sleep(0.2)


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
    env = child_environment(KINORA_VAR_DIR=str(var), PYTHONUNBUFFERED="1")
    # Ctrl-C ends everything within GRACE_SECONDS: the API's drain is short here.
    env.setdefault("DRAIN_SECONDS", "2")
    if METRICS_DIR_ENV not in env:
        # One directory of metric files for the API and the worker: the API's /metrics
        # shows the worker's task outcomes and model latency too.
        metrics_dir = var / "metrics" / "up"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        env[METRICS_DIR_ENV] = str(metrics_dir)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        raise Stop(signal.Signals(signum).name)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # SIGHUP: terminal closed
        signal.signal(signum, on_signal)

    try:
        with VarLock(var):
            return _run_locked(var, env, host=host, port=port, workers=workers)
    except Stop as refused:
        print(f"kinora up: {refused}", file=sys.stderr, flush=True)
        return 1


def _run_locked(var: Path, env: dict[str, str], *, host: str, port: int, workers: int) -> int:
    settings = get_settings()
    embedded: EmbeddedRedis | None = None
    children: list[Child] = []
    code = 0
    try:
        if not settings.redis_url:
            embedded = EmbeddedRedis(Path(var) / "redis", spawn_options=tied)
            redis_server = embedded  # for the closure: started again on the same port

            def start_redis() -> subprocess.Popen[bytes] | None:
                return redis_server.start().process

            children.append(Child(REDIS, start_redis))
            children[-1].start()
            env["REDIS_URL"] = embedded.url
            print(f"Redis: embedded at {embedded.url} (data in {var / 'redis'})", flush=True)
        # The migrations' own lines would bury the ones a user needs (`kinora db
        # upgrade` shows them).
        logging.getLogger("alembic").setLevel(logging.WARNING)
        upgrade()
        token = demo_token(settings)
        worker_args = ["worker", "--concurrency", str(workers), "--quiet"]
        api_args = ["api", "--host", host, "--port", str(port)]
        webhook_args = ["worker", "--webhooks", "--quiet"]
        children.append(Child("kinora worker", lambda: spawn(worker_args, env, signal.SIGKILL)))
        children.append(Child("kinora webhooks", lambda: spawn(webhook_args, env, signal.SIGKILL)))
        children.append(Child("kinora api", lambda: spawn(api_args, env)))
        for child in children[-3:]:
            child.start()
        base = f"http://{host}:{port}"
        wait_healthy(f"{base}/healthz", children)
        if embedded:
            wait_worker(env["REDIS_URL"], children)
        else:
            wait_worker(settings.broker_url or settings.required_redis_url, children)
        # Last, after the children's start-up lines, so that they stand out.
        print(
            f"\nKinora is running (Ctrl-C stops it). API docs: {base}/docs\n"
            f"Open {base}/?token={token}\nToken: {token}\n",
            flush=True,
        )
        supervise(children)
    except Stop as reason:
        text = str(reason)
        code = 0 if text in ("SIGTERM", "SIGINT", "SIGHUP") else 1
        print(f"Stopping ({text})...", file=sys.stderr, flush=True)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        # Redis last: the worker and the API can still publish while they stop.
        stop_children([c.process for c in children if c.process and c.name != REDIS])
        if embedded is not None:
            embedded.stop()
    return code
