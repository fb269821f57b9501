"""Real parts for the tests: a Redis server on 127.0.0.1, a SQLite database, and (for
end-to-end tests) a Celery worker and the API under uvicorn as subprocesses.

The session shares one Redis server and one running stack; each test makes its own
user and its own videos, so its assertions can be exact. Tests that drive the hub
or the logger directly use video ids far above any the stack creates.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from kinora.cli.embedded import EmbeddedRedis, free_port
from kinora.core import db
from kinora.core.config import get_settings
from kinora.jobs.accounts import create_user
from kinora.streaming import events

# Settings every process of the test session shares (CONTRACT §2 names).
FAST = {
    "MOCK_STEP_SECONDS": "0.2",
    "SSE_PING_SECONDS": "0.5",
    "SSE_SEND_TIMEOUT_SECONDS": "2",
    "STREAM_QUEUE_SIZE": "64",
    "SECRET_KEY": "test-secret-key",
    "VIDEO_COST": "100",
    "LEASE_SECONDS": "3",
    "SWEEP_INTERVAL_SECONDS": "1",
    "RETRY_COUNTDOWN_SECONDS": "1",
    "VIDEO_TIMEOUT_SECONDS": "12",
    "WS_PING_SECONDS": "0.5",
    "WS_PONG_TIMEOUT_SECONDS": "1.5",
    "PRESENCE_TTL_SECONDS": "2",
}


def reset_caches() -> None:
    """Forget cached settings, engines and clients after the environment changed."""
    get_settings.cache_clear()
    if db.get_engine.cache_info().currsize:
        db.get_engine().dispose()
    db.get_engine.cache_clear()
    db.get_sessionmaker.cache_clear()
    events._sync_clients.clear()


@pytest.fixture(scope="session")
def var_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("var")


@pytest.fixture(scope="session")
def redis_server(var_dir: Path) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(var_dir / "redis", persist=False) as server:
        yield server


@pytest.fixture(scope="session")
def database_url(var_dir: Path) -> Iterator[str]:
    """SQLite by default; a throwaway PostgreSQL server with KINORA_TEST_DB=postgres
    (`make test` runs the database-heavy tests both ways)."""
    if os.environ.get("KINORA_TEST_DB", "sqlite") == "postgres":
        from tests.postgres import ThrowawayPostgres

        server = ThrowawayPostgres().start()
        try:
            yield server.url
        finally:
            reset_caches()  # close pooled connections before the server goes
            server.stop()
    else:
        yield f"sqlite:///{var_dir / 'kinora.db'}"


@pytest.fixture(scope="session")
def environment(
    var_dir: Path, redis_server: EmbeddedRedis, database_url: str
) -> Iterator[dict[str, str]]:
    """The environment of the session: set here for in-process code, passed on to the
    subprocesses."""
    env = {
        **FAST,
        "KINORA_VAR_DIR": str(var_dir),
        "REDIS_URL": redis_server.url,
        "DATABASE_URL": database_url,
        # The API and the worker share metric files, as under `kinora up`.
        "PROMETHEUS_MULTIPROC_DIR": str(var_dir / "metrics"),
    }
    (var_dir / "metrics").mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        reset_caches()
        db.upgrade()
        yield dict(os.environ)
    reset_caches()


@pytest.fixture
def redis_client(environment: dict[str, str]) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(environment["REDIS_URL"])
    yield client
    client.close()


_emails = itertools.count(1)


@dataclass
class Account:
    id: int
    email: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def make_account(*, credits: int = 1000, plan: str = "pro") -> Account:
    email = f"user{next(_emails)}-{time.monotonic_ns()}@test.kinora"
    user, token = create_user(email, credits=credits, plan=plan)
    return Account(user.id, email, token)


@pytest.fixture
def account(environment: dict[str, str]) -> Account:
    return make_account()


_video_ids = itertools.count(10_000_000)


@pytest.fixture
def video_id(environment: dict[str, str]) -> int:
    """A video id no running stack will use, for tests that drive events directly."""
    return next(_video_ids)


def wait_for(what: str, check: object, timeout: float, interval: float = 0.05) -> None:
    """Poll `check()` until it is truthy; fail after `timeout` seconds."""
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
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


@pytest.fixture(scope="session")
def stack(environment: dict[str, str], var_dir: Path) -> Iterator[Stack]:
    """A real Celery worker and the real API under uvicorn on 127.0.0.1."""
    logs = var_dir / "logs"
    logs.mkdir(exist_ok=True)
    port = free_port()
    worker = kinora("worker", "--concurrency", "2", env=environment, log=logs / "worker.log")
    api = kinora("api", "--port", str(port), env=environment, log=logs / "api.log")
    base_url = f"http://127.0.0.1:{port}"
    running = Stack(base_url, api, worker, logs)
    try:

        def api_up() -> bool:
            assert api.poll() is None, (logs / "api.log").read_text()
            try:
                return httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for("the API", api_up, timeout=30)
        wait_for("the worker", lambda: worker_ready(environment), timeout=30, interval=0.2)
        yield running
    finally:
        stop(api)
        stop(worker)
    assert_ledger_matches_balances()


def assert_ledger_matches_balances() -> None:
    """After everything the session did (charges, retries, refunds, cancels, crashes),
    every user's credit ledger still sums to their balance."""
    from sqlalchemy import func, select

    from kinora.core.models import CreditEntry, User

    with db.session_scope() as session:
        ledger = dict(
            session.execute(
                select(CreditEntry.user_id, func.sum(CreditEntry.amount)).group_by(
                    CreditEntry.user_id
                )
            ).all()
        )
        balances = dict(session.execute(select(User.id, User.credits)).all())
    assert {u: ledger.get(u, 0) for u in balances} == balances


def sse_events(lines: list[str]) -> list[dict[str, object]]:
    """The JSON of every `data:` line, in order."""
    import json

    return [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
