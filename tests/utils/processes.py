"""Real processes for the tests: `kinora api` and `kinora worker` as subprocesses on
127.0.0.1, started, awaited (bounded) and stopped."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import redis

from kinora.cli.embedded import free_port
from tests.utils.accounts import Account


def wait_for(
    what: str | Callable[[], str], check: object, timeout: float, interval: float = 0.05
) -> None:
    """Poll `check()` until it is truthy; fail after `timeout` seconds, saying `what`
    (or what `what()` says then: what was seen on the way)."""
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            said = what() if callable(what) else what
            pytest.fail(f"timed out after {timeout} s waiting for {said}")
        time.sleep(interval)


def kinora(*args: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "kinora", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def start_api(
    env: dict[str, str], log: Path, port: int | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """`kinora api` on 127.0.0.1 (a free port unless given), once it answers."""
    port = port or free_port()
    api = kinora("api", "--port", str(port), env=env, log=log)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert api.poll() is None, log.read_text()
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(f"the API on port {port}", up, timeout=30)
    return api, base


def stop(process: subprocess.Popen[bytes], timeout: float = 10) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait(5)


@dataclass
class Stack:
    base_url: str
    api: subprocess.Popen[bytes]
    worker: subprocess.Popen[bytes]
    logs: Path

    def client(self, account: Account | None = None, timeout: float = 30) -> httpx.Client:
        headers = account.headers if account else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)


def worker_ready(env: dict[str, str]) -> bool:
    """A worker answers a ping on `env`'s broker."""
    from kinora.jobs.dispatch import make_celery

    app = make_celery(env.get("BROKER_URL") or env.get("REDIS_URL"))
    try:
        return bool(app.control.ping(timeout=0.5))
    finally:
        app.close()


class Up:
    """`kinora up` in `cwd` (its state under `cwd/var`) on `port`, with `env`."""

    def __init__(self, cwd: Path, port: int, env: dict[str, str]) -> None:
        self.cwd = cwd
        self.base = f"http://127.0.0.1:{port}"
        self.log = cwd / f"up-{time.monotonic_ns()}.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kinora", "up", "--port", str(port)],
                cwd=cwd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def token(self) -> str:
        def printed() -> bool:
            assert self.process.poll() is None, self.text()
            return "Token: " in self.text()

        wait_for("kinora up's Token line", printed, timeout=60)
        tokens: list[str] = re.findall(r"^Token: (\S+)$", self.text(), re.M)
        return tokens[-1]

    def redis(self) -> redis.Redis:
        url = re.findall(r"Redis: embedded at (\S+)", self.text())[-1]
        return redis.Redis.from_url(url, socket_timeout=5)

    def child(self, word: str) -> psutil.Process:
        """The direct child whose command line has `word` (api, worker, redis-server)."""
        for child in psutil.Process(self.process.pid).children():
            if word in " ".join(child.cmdline()):
                return child
        raise AssertionError(f"no child {word!r} of kinora up")

    def stop(self, sig: int = signal.SIGINT, *, check: bool = True) -> None:
        """Stop it with `sig`; `check`: it must exit cleanly (0) within 15 s. Whatever
        is left is killed."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                code = self.process.wait(15)
                assert code == 0 or not check, self.text()
            finally:
                if self.process.poll() is None:
                    for child in psutil.Process(self.process.pid).children(recursive=True):
                        child.kill()
                    self.process.kill()
