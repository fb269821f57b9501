"""Real parts for the tests: a Redis server on 127.0.0.1, a SQLite database, and (for
end-to-end tests) a Celery worker and the API under uvicorn as subprocesses.

The session shares one Redis server and one running stack; each test makes its own
user and its own videos, so its assertions can be exact. Tests that drive the hub
or the logger directly use video ids far above any the stack creates.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import redis
from fastapi.testclient import TestClient

from kinora.api.app import create_app
from kinora.cli.embedded import EmbeddedRedis, free_port
from kinora.core import db
from kinora.jobs import dispatch
from tests.utils.accounts import Account, assert_ledger_matches_balances, make_account
from tests.utils.inprocess import InProcessApi
from tests.utils.processes import Stack, kinora, stop, wait_for, worker_ready
from tests.utils.settings import FAST, reset_caches

# The tests read what tasks returned (a duplicate delivery's "skipped"); the API's own
# processes do not keep results.
dispatch.keep_results()

# Every process this run starts inherits this mark (subprocesses take os.environ): at
# the end, any still alive was left behind by a test, and fails the run.
RUN_MARK = "KINORA_TEST_RUN"
os.environ.setdefault(RUN_MARK, f"{os.getpid()}-{time.time_ns()}")


def left_behind() -> list[psutil.Process]:
    """The processes this run started that are still alive (but pytest itself)."""
    mark, found = os.environ[RUN_MARK], []
    for process in psutil.process_iter():
        if process.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error):
            if process.environ().get(RUN_MARK) == mark:
                found.append(process)
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A test stops every process it starts: none may outlive the run (a stray worker
    would take the next run's jobs, or hold its ports)."""
    _, alive = psutil.wait_procs(left_behind(), timeout=10)  # a few may be still stopping
    if not alive:
        return
    names = [f"{p.pid}: {' '.join(p.cmdline())[:160]}" for p in alive if p.is_running()]
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    if names:
        print("\nprocesses left behind by the tests (now killed):\n  " + "\n  ".join(names))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that needs the running stack (uvicorn and a Celery worker) is end-to-end:
    `make test-fast` leaves it out."""
    for item in items:
        if "stack" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


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
        from tests.utils.postgres import ThrowawayPostgres

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
def api(environment: dict[str, str]) -> Iterator[TestClient]:
    """The API in this process, its lifespan (the hub) included, on the session's Redis
    and database: for tests that need no streaming server and no worker."""
    with TestClient(create_app(), base_url="http://kinora.test") as client:
        yield client


@pytest.fixture
def app(api: TestClient) -> InProcessApi:
    """The in-process API with a client per account, as `stack` has."""
    return InProcessApi(api)


@pytest.fixture
def redis_client(environment: dict[str, str]) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(environment["REDIS_URL"])
    yield client
    client.close()


@pytest.fixture
def account(environment: dict[str, str]) -> Account:
    return make_account()


_video_ids = itertools.count(10_000_000)


@pytest.fixture
def video_id(environment: dict[str, str]) -> int:
    """A video id no running stack will use, for tests that drive events directly."""
    return next(_video_ids)


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
        stop(worker, timeout=3)  # its warm shutdown is no part of the tests: 10 s of waiting
    assert_ledger_matches_balances()
