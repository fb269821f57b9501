"""The WebSocket stream with a real client over uvicorn (docs/protocol.md §3). The test
stack pings every 0.5 s and closes after 1.5 s without a pong."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.utils.accounts import Account, make_account
from tests.utils.clients import pending_video, read_stream, submit
from tests.utils.processes import Stack

pytestmark = pytest.mark.slow

NAMES = {
    "progress": "progress_update",
    "stage": "stage_change",
    "log": "log",
    "error": "error",
    "complete": "complete",
}


def ws_url(stack: Stack, video_id: int, token: str) -> str:
    return f"ws{stack.base_url[4:]}/api/v1/projects/{video_id}/progress?token={token}"


def listen(
    url: str, *, answer_pings: bool = True, timeout: float = 60
) -> tuple[list[dict[str, Any]], int | None]:
    """Every message until the server closes; returns them and the close code."""
    messages: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    with connect(url, open_timeout=10) as ws:
        try:
            while True:
                assert time.monotonic() < deadline, "still open"
                msg = json.loads(ws.recv(timeout=10))
                messages.append(msg)
                if msg["event"] == "ping" and answer_pings:
                    ws.send(json.dumps({"event": "pong"}))
        except ConnectionClosed as closed:
            return messages, closed.rcvd.code if closed.rcvd else None


def events_in(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The log of initial_state followed by the live events."""
    (state,) = [m["data"] for m in messages if m["event"] == "initial_state"]
    live = [m for m in messages if m["event"] not in ("connected", "initial_state", "ping")]
    for m in live:
        assert m["event"] == NAMES[m["data"]["type"]]
    return [*state["logs"], *(m["data"] for m in live)]


def test_messages_arrive_in_order_with_their_names(stack: Stack, account: Account) -> None:
    created = submit(stack, account, "A carousel spinning at a fair")
    token = created["stream_url"].split("token=")[1]
    messages, code = listen(ws_url(stack, created["video_id"], token))

    assert code == 1000
    assert messages[0]["event"] == "connected"
    assert messages[0]["data"]["project_id"] == created["video_id"]
    assert messages[1]["event"] == "initial_state"
    assert set(messages[1]["data"]) == {"status", "progress", "logs"}
    assert any(m["event"] == "ping" for m in messages)
    events = events_in(messages)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == "complete"
    assert events[-1]["status"] == "completed"
    # the same events as the SSE stream
    _, lines = read_stream(created["stream_url"])
    assert [json.loads(line[6:]) for line in lines if line.startswith("data: ")] == events


def test_two_clients_and_a_late_one_see_the_same_story(stack: Stack, account: Account) -> None:
    created = submit(stack, account, "Two friends watching the same kite")
    url = ws_url(stack, created["video_id"], account.token)
    results: list[list[dict[str, Any]]] = []

    def one() -> None:
        messages, _ = listen(url)
        results.append(events_in(messages))

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    late, code = listen(url)

    assert len(results) == 2
    assert results[0] == results[1]
    # a reconnect after the end: initial_state carries the whole log, then a close
    assert [m["event"] for m in late] == ["connected", "initial_state"]
    assert late[1]["data"]["logs"] == results[0]
    assert late[1]["data"]["status"] == "completed"
    assert code == 1000


def test_a_client_that_never_answers_pings_is_closed(stack: Stack, account: Account) -> None:
    video_id = pending_video(account)
    started = time.monotonic()
    messages, code = listen(ws_url(stack, video_id, account.token), answer_pings=False)
    assert code == 4408
    assert 1.5 <= time.monotonic() - started < 10
    assert [m["event"] for m in messages][:2] == ["connected", "initial_state"]


def test_a_client_that_answers_pings_stays(stack: Stack, account: Account) -> None:
    video_id = pending_video(account)
    with connect(ws_url(stack, video_id, account.token), open_timeout=10) as ws:
        end = time.monotonic() + 3  # twice the pong timeout
        while time.monotonic() < end:
            msg = json.loads(ws.recv(timeout=5))
            if msg["event"] == "ping":
                ws.send(json.dumps({"event": "pong"}))
        # Past twice the pong timeout, it is still open and still pinged.
        while (msg := json.loads(ws.recv(timeout=5)))["event"] != "ping":
            pass
        assert msg["event"] == "ping"


def test_bad_token_is_4401_and_foreign_video_4404(stack: Stack, account: Account) -> None:
    other = make_account()
    theirs = pending_video(other)
    for url, expected in [
        (ws_url(stack, theirs, "kin_wrong"), 4401),
        (ws_url(stack, theirs, account.token), 4404),
        (ws_url(stack, 987654321, account.token), 4404),
    ]:
        _, code = listen(url)
        assert code == expected, url


def test_no_token_is_4401(stack: Stack) -> None:
    _, code = listen(f"ws{stack.base_url[4:]}/api/v1/projects/1/progress")
    assert code == 4401
