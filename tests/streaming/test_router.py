"""The live-progress layer in another app (docs/library.md): a Celery task that is not a
video publishes with `SSELogger.for_task(self)` and `update(i, n)`; a FastAPI app
that is not Kinora serves it with `progress_router`. A real Celery worker (in a
thread), a real Redis, a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from fastapi import FastAPI, Request
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from kinora.streaming import SSELogger, progress_router
from tests.utils.clients import events_of, read_stream
from tests.utils.processes import wait_for
from tests.utils.servers import serve

ROWS = 7


def can_watch(request: Any, job_id: str) -> bool:
    return not job_id.startswith("secret")


async def can_watch_async(request: Request, job_id: str) -> bool:
    return can_watch(request, job_id)


@pytest.fixture
def broker_only(environment: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """REDIS_URL unset: the task's events must find Redis through its broker. (The layer
    reads the environment when it is asked, and none of Kinora's settings: nothing to
    forget.)"""
    url = environment["REDIS_URL"]
    monkeypatch.delenv("REDIS_URL")
    yield url
    monkeypatch.setenv("REDIS_URL", url)


@pytest.fixture
def importer(broker_only: str) -> Iterator[Celery]:
    app = Celery("csv_import", broker=broker_only, set_as_current=False)
    app.conf.update(task_default_queue=f"csv-{time.monotonic_ns()}")

    @app.task(bind=True, name="csv_import.import_rows", shared=False)  # type: ignore[untyped-decorator]
    def import_rows(self: Any, rows: int) -> int:
        with SSELogger.for_task(self) as log:
            for i in range(1, rows + 1):
                log.update(i, rows, f"row {i} imported")
            log.complete()
        return rows

    with start_worker(app, pool="solo", perform_ping_check=False, loglevel="WARNING"):
        yield app


@pytest.fixture
def host(broker_only: str) -> Iterator[str]:
    app = FastAPI(title="not Kinora")
    # No REDIS_URL here: the router is told where Redis is.
    router = progress_router(authorize=can_watch_async, redis_url=broker_only)
    app.include_router(router, prefix="/progress")
    with serve(app) as base:
        yield base


def test_a_celery_task_streams_its_progress_to_another_app(importer: Celery, host: str) -> None:
    job = f"import-{time.monotonic_ns()}"
    url = f"{host}/progress/{job}/stream"
    with httpx.Client(timeout=httpx.Timeout(10, read=10)) as client:
        with client.stream("GET", url) as response:  # watching before the task starts
            assert response.status_code == 200
            importer.send_task("csv_import.import_rows", args=[ROWS], task_id=job)
            lines = []
            for line in response.iter_lines():
                lines.append(line)
                if line.startswith("data: ") and json.loads(line[6:])["type"] == "complete":
                    break
        events = events_of(lines)
        assert [e["seq"] for e in events] == list(range(1, ROWS + 2))
        assert {e["job_id"] for e in events} == {job}
        updates = events[:-1]
        assert [e["progress"] for e in updates] == [round(100 * i / ROWS) for i in range(1, 8)]
        assert [(e["current"], e["total"]) for e in updates] == [(i, ROWS) for i in range(1, 8)]
        assert updates[2]["message"] == "row 3 imported"
        assert (events[-1]["type"], events[-1]["status"]) == ("complete", "completed")

        # The client has the end: EventSource stops on a 204.
        last = client.get(url, headers={"Last-Event-ID": str(events[-1]["seq"])})
        assert last.status_code == 204
        # A late client gets the whole story, then the response ends.
        status, late = read_stream(url, timeout=10)
        assert status == 200
        assert events_of(late) == events
        # Polling: the state and the events so far.
        snapshot = client.get(f"{host}/progress/{job}").json()
        assert (snapshot["status"], snapshot["progress"]) == ("completed", 100)
        assert snapshot["last_event_id"] == str(ROWS + 1)
        assert snapshot["logs"] == events


def test_the_authorize_hook_decides_and_says_404(host: str) -> None:
    with httpx.Client(base_url=host, timeout=10) as client:
        for path in ("/progress/secret-1/stream", "/progress/secret-1"):
            response = client.get(path)
            assert response.status_code == 404, path
            assert response.json()["detail"] == "job secret-1 not found"
        assert client.get("/progress/7/stream", headers={"Last-Event-ID": "x"}).status_code == 400


def test_the_websocket_serves_the_same_events(importer: Celery, host: str) -> None:
    job = f"import-ws-{time.monotonic_ns()}"
    ws_url = host.replace("http://", "ws://") + f"/progress/{job}/ws"
    with connect(ws_url, open_timeout=10) as ws:
        hello = json.loads(ws.recv(timeout=10))
        assert hello["event"] == "connected"
        assert hello["data"]["job_id"] == job
        state = json.loads(ws.recv(timeout=10))
        assert state == {
            "event": "initial_state",
            "data": {"status": "pending", "progress": 0, "logs": []},
        }
        importer.send_task("csv_import.import_rows", args=[3], task_id=job)
        received: list[dict[str, Any]] = []
        deadline = time.monotonic() + 30  # pings come on their own: bound the whole wait
        while not received or received[-1]["event"] != "complete":
            assert time.monotonic() < deadline, received
            message = json.loads(ws.recv(timeout=10))
            if message["event"] != "ping":
                received.append(message)
    assert [m["event"] for m in received] == ["progress_update"] * 3 + ["complete"]
    assert [m["data"]["progress"] for m in received[:3]] == [33, 67, 100]
    with connect(host.replace("http://", "ws://") + "/progress/secret-2/ws") as ws:
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        assert ws.close_code == 4404


def test_a_host_starts_while_redis_is_down_and_streams_once_it_comes(tmp_path: Any) -> None:
    """docs/library.md: the library never stops its host from starting. With nothing on the
    router's Redis port, the app starts, its progress routes answer 503 with Retry-After;
    once a Redis listens there, a job's events stream."""
    from kinora.cli.embedded import EmbeddedRedis, free_port

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    app = FastAPI()
    app.include_router(progress_router(authorize=can_watch, redis_url=url), prefix="/progress")
    with serve(app) as base:
        down = httpx.get(f"{base}/progress/late-redis/stream", timeout=10)
        assert down.status_code == 503
        assert down.headers["retry-after"]
        with EmbeddedRedis(tmp_path / "redis", port=port, persist=False):
            with SSELogger("late-redis", kind="job", redis_url=url) as log:
                log.update(1, 2, "half")
                log.complete()
            seen: list[int] = []

            def streams() -> bool:
                status, lines = read_stream(f"{base}/progress/late-redis/stream", timeout=10)
                seen.append(status)
                return status == 200 and len(events_of(lines)) == 2

            wait_for(lambda: f"the stream once Redis listens (answers: {seen})", streams, 15)


def test_a_router_of_another_kind_serves_that_kinds_jobs(redis_client: Any) -> None:
    """docs/library.md: `progress_router(kind="import")` serves what `SSELogger(id,
    kind="import")` publishes, named `import_id`; the default kind, `job`, does not."""
    with SSELogger("run-42", kind="import") as log:
        log.update(1, 1, "all rows")
        log.complete()
    app = FastAPI()
    app.include_router(progress_router(authorize=can_watch, kind="import"), prefix="/imports")
    app.include_router(progress_router(authorize=can_watch), prefix="/jobs")
    with serve(app) as base:
        status, lines = read_stream(f"{base}/imports/run-42/stream", timeout=10)
        snapshot = httpx.get(f"{base}/imports/run-42", timeout=10).json()
        other = httpx.get(f"{base}/jobs/run-42", timeout=10).json()
    assert status == 200
    assert [(e["import_id"], e["seq"]) for e in events_of(lines)] == [("run-42", 1), ("run-42", 2)]
    assert (snapshot["import_id"], snapshot["status"]) == ("run-42", "completed")
    assert other["logs"] == []
