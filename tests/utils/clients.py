"""Reading SSE streams in tests, bounded in time."""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import httpx
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection

from tests.utils.accounts import Account
from tests.utils.processes import Stack


def submit(stack: Stack, account: Account, prompt: str, **body: Any) -> dict[str, Any]:
    with stack.client(account) as client:
        response = client.post("/api/v1/videos/generate", json={"prompt": prompt, **body})
    assert response.status_code == 202, response.text
    result: dict[str, Any] = response.json()
    return result


def read_stream(
    url: str,
    *,
    headers: dict[str, str] | None = None,
    limit: int | None = None,
    timeout: float = 60,
) -> tuple[int, list[str]]:
    """GET an SSE stream; returns its status and raw lines. Stops after `limit` events
    (dropping the connection) or when the server ends the response."""
    lines: list[str] = []
    seen = 0
    deadline = time.monotonic() + timeout
    with (
        httpx.Client(timeout=httpx.Timeout(10, read=10)) as client,
        client.stream("GET", url, headers=headers) as response,
    ):
        if response.status_code != 200:
            return response.status_code, []
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            lines.append(line)
            if line.startswith("data: "):
                seen += 1
                if limit is not None and seen >= limit:
                    break
            assert time.monotonic() < deadline, f"stream still open after {timeout} s"
    return 200, lines


def events_of(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in lines if line.startswith("data: ")]


def ids_of(lines: list[str]) -> list[str]:
    return [line[4:] for line in lines if line.startswith("id: ")]


def assert_whole_generation(events: list[dict[str, Any]]) -> None:
    """Every step 0-9 in order, seq 1..n, progress never backwards, ending complete."""
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(events) + 1))
    assert [e["id"] for e in events] == [str(s) for s in seqs]
    steps = [e["step"] for e in events if "step" in e]
    assert steps == sorted(steps)
    assert set(steps) == set(range(10))
    progress = [e["progress"] for e in events if "progress" in e]
    assert progress == sorted(progress)
    assert progress[-1] == 100
    stages = [(e["stage"], e["previous_stage"]) for e in events if e["type"] == "stage"]
    assert stages == [
        ("preparing", None),
        ("generating", "preparing"),
        ("finalizing", "generating"),
    ]
    assert events[-1]["type"] == "complete"
    assert events[-1]["status"] == "completed"
    assert [e["type"] for e in events].count("complete") == 1


class Follower(threading.Thread):
    """A client like `EventSource`: reads a video's stream, and when the connection
    drops, reconnects with Last-Event-ID to the first API that answers."""

    def __init__(self, apis: list[str], video_id: int, token: str) -> None:
        super().__init__(daemon=True)
        self.apis = apis
        self.video_id = video_id
        self.token = token
        self.events: list[dict[str, Any]] = []
        self.connections: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        deadline = time.monotonic() + 120
        try:
            while time.monotonic() < deadline:
                if self.events and self.events[-1]["type"] == "complete":
                    return
                for api in self.apis:
                    if self._read(api):
                        break
                else:
                    time.sleep(0.2)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def _read(self, api: str) -> bool:
        headers = {"Authorization": f"Bearer {self.token}"}
        if self.events:
            headers["Last-Event-ID"] = self.events[-1]["id"]
        url = f"{api}/api/v1/videos/{self.video_id}/stream"
        try:
            with (
                httpx.Client(timeout=httpx.Timeout(5, read=10)) as client,
                client.stream("GET", url, headers=headers) as response,
            ):
                self.connections.append(api)
                if response.status_code != 200:
                    return False
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(json.loads(line[6:]))
        except httpx.TransportError:
            return False  # the API is gone (or went away mid-stream): try the next
        return True


def fresh_machine_env(**settings: str) -> dict[str, str]:
    """The environment of `kinora up` on a fresh machine: no REDIS_URL or DATABASE_URL
    (the embedded defaults, state under ./var), plus `settings`."""
    kept = {
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
    return {**kept, **settings}


def pending_video(account: Account, prompt: str = "A red kite flying over green hills") -> int:
    """A video row that is never queued: it stays pending."""
    from kinora.core.db import session_scope
    from kinora.core.models import User
    from kinora.jobs import store

    with session_scope() as session:
        user = session.get(User, account.id)
        assert user is not None
        video, _ = store.create_video(
            session, user, prompt=prompt, parameters={}, cost=0, task_id="never-queued"
        )
    return video.id


def close_code(ws: ClientConnection, within: float) -> int | None:
    """The code the server closes `ws` with (its pings read and dropped), or None if it
    is still open after `within` seconds."""
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            ws.recv(timeout=max(0.1, deadline - time.monotonic()))
    except TimeoutError:
        return None
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd else None
    return None
