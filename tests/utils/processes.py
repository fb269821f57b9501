"""Real processes for the tests: `kinora api` and `kinora worker` as subprocesses on
127.0.0.1, started, awaited (bounded) and stopped."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

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
    from kinora.jobs.dispatch import make_celery

    app = make_celery()
    try:
        return bool(app.control.ping(timeout=0.5))
    finally:
        app.close()
