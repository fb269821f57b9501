"""One page, twenty streams at once: Kinora behind nginx over HTTPS and HTTP/2
(deploy/nginx/kinora-https.conf), in Chromium. A browser holds at most six HTTP/1.1
connections per origin, and an EventSource holds its connection for as long as it
streams; over HTTP/2 all of a page's streams share one connection, and the page's
WebSocket still works beside them."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page

from kinora.streaming import keys
from kinora.streaming.logger import SSELogger
from tests.utils.accounts import Account
from tests.utils.clients import pending_video
from tests.utils.nginx import front
from tests.utils.processes import start_api, stop

pytestmark = pytest.mark.slow

STREAMS = 20

# Each EventSource of the page: its seqs, and whether it is open (readyState 1).
OPEN_ALL = """([urls]) => {
  window.seen = urls.map(() => []);
  window.sources = urls.map((url, i) => {
    const source = new EventSource(url);
    source.onmessage = (e) => window.seen[i].push(JSON.parse(e.data).seq);
    return source;
  });
}"""
STATE = "() => window.sources.map((s, i) => [s.readyState, window.seen[i].slice()])"
SOCKET = """([url]) => new Promise((resolve, reject) => {
  const socket = new WebSocket(url);
  socket.onmessage = (e) => {
    const message = JSON.parse(e.data);
    if (message.event === "initial_state") resolve(message.event);
  };
  socket.onclose = (e) => reject(new Error(`closed: ${e.code}`));
  setTimeout(() => reject(new Error("no initial_state within 10 s")), 10000);
})"""


@pytest.fixture
def api_port(environment: dict[str, str], tmp_path: Path) -> Iterator[int]:
    api, base = start_api(environment, tmp_path / "api.log")
    try:
        yield int(base.rsplit(":", 1)[1])
    finally:
        stop(api)


@pytest.fixture
def videos(account: Account, api_port: int) -> Iterator[list[int]]:
    """STREAMS pending videos of the account's, cancelled afterwards (a worker that
    starts later would otherwise queue every pending video it finds and generate them
    before the next test's)."""
    videos = [pending_video(account, f"A paper boat on a river, take {i}") for i in range(STREAMS)]
    yield videos
    with httpx.Client(base_url=f"http://127.0.0.1:{api_port}", headers=account.headers) as api:
        for video in videos:
            assert api.post(f"/api/v1/videos/{video}/cancel").status_code == 200


def test_one_page_holds_twenty_streams_at_once_over_http2(
    browser: Browser, account: Account, api_port: int, videos: list[int], tmp_path: Path
) -> None:
    urls = [f"/api/v1/videos/{video}/stream?token={account.token}" for video in videos]
    with front(tmp_path, [api_port, api_port], https=True) as base:
        context = browser.new_context(ignore_https_errors=True)  # the test's own certificate
        page = context.new_page()
        responses = _responses(page)
        page.goto(f"{base}/healthz")
        page.evaluate(OPEN_ALL, [urls])
        # Every stream is open at once, then each gets an event published after that.
        _wait(page, lambda state: all(ready == 1 for ready, _ in state), "all twenty open")
        # The page's WebSocket through the same configuration, beside them (over a
        # connection of its own: nginx offers WebSockets over HTTP/1.1 only).
        ws = base.replace("https://", "wss://") + f"/api/v1/projects/{videos[0]}/progress"
        assert page.evaluate(SOCKET, [f"{ws}?token={account.token}"]) == "initial_state"
        with _loggers(videos) as logs:
            for log in logs:
                log.step(1, "Validating the prompt")
            _wait(page, lambda state: all(seen == [1] for _, seen in state), "the event on each")
            streams = [r for r in responses if "/stream" in r["url"]]
            assert len(streams) == STREAMS, streams
            assert {r["protocol"] for r in streams} == {"h2"}, streams
            # One connection carries them all.
            assert len({r["connectionId"] for r in streams}) == 1, streams
            for log in logs:
                log.complete()
            _wait(page, lambda state: all(seen == [1, 2] for _, seen in state), "every end")
        context.close()


def test_over_http1_the_same_page_holds_six(
    browser: Browser, account: Account, api_port: int, videos: list[int], tmp_path: Path
) -> None:
    """Why the HTTPS configuration: the same page through kinora.conf, over HTTP/1.1,
    gets at most six of its twenty streams; the rest wait for a connection."""
    urls = [f"/api/v1/videos/{video}/stream?token={account.token}" for video in videos]
    with front(tmp_path, [api_port, api_port]) as base:
        page = browser.new_page()
        page.goto(f"{base}/healthz")
        page.evaluate(OPEN_ALL, [urls])
        _wait(page, lambda state: sum(ready == 1 for ready, _ in state) >= 6, "six open")
        with _loggers(videos) as logs:
            for log in logs:
                log.step(1, "Validating the prompt")
            _wait(page, lambda state: sum(seen == [1] for _, seen in state) >= 6, "six events")
            time.sleep(2)  # time enough for more, had there been connections for them
            state = page.evaluate(STATE)
            assert sum(ready == 1 for ready, _ in state) == 6, state
            assert sum(seen == [1] for _, seen in state) == 6, state
            for log in logs:
                log.complete()
        page.close()


def _responses(page: Page) -> list[dict[str, Any]]:
    """Each response the page gets, as Chromium's network log has it (its protocol and
    the id of the connection it came on)."""
    received: list[dict[str, Any]] = []
    session = page.context.new_cdp_session(page)
    session.send("Network.enable")
    session.on("Network.responseReceived", lambda event: received.append(event["response"]))
    return received


def _wait(page: Page, done: Any, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not done(state := page.evaluate(STATE)):
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} within {timeout} s: {json.dumps(state)}")
        time.sleep(0.1)


@contextlib.contextmanager
def _loggers(videos: list[int]) -> Iterator[list[SSELogger]]:
    """An SSELogger per video, as the worker's."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(SSELogger(keys.video(video))) for video in videos]
