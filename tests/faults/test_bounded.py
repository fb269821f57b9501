"""Memory is bounded per connection (README, Faults): a long history goes out in pages,
every event once and in order, and a user's concurrent streams are capped."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from kinora.streaming import keys
from kinora.streaming.logger import SSELogger
from tests.utils.accounts import Account
from tests.utils.clients import events_of, pending_video, read_stream
from tests.utils.processes import Stack, start_api, stop, wait_for

pytestmark = pytest.mark.slow


def test_a_history_longer_than_a_page_is_replayed_whole_and_in_order(
    stack: Stack, account: Account
) -> None:
    video = pending_video(account)
    log = SSELogger(keys.video(video))
    for i in range(449):
        log.log(f"event {i}", payload="x" * 500)
    log.complete(status="cancelled")
    url = f"{stack.base_url}/api/v1/videos/{video}/stream"
    headers = {"Authorization": f"Bearer {account.token}"}
    for after, first in ((0, 1), (100, 101), (399, 400)):
        status, lines = read_stream(url, headers={**headers, "Last-Event-ID": str(after)})
        assert status == 200
        assert [e["seq"] for e in events_of(lines)] == list(range(first, 451))


def test_a_users_concurrent_streams_are_capped(
    environment: dict[str, str], account: Account, tmp_path: Path
) -> None:
    api, base = start_api({**environment, "MAX_STREAMS_PER_USER": "2"}, tmp_path / "api.log")
    try:
        video = pending_video(account)
        url = f"{base}/api/v1/videos/{video}/stream"
        headers = {"Authorization": f"Bearer {account.token}"}
        with httpx.Client(timeout=httpx.Timeout(10, read=10)) as client:
            first = client.send(client.build_request("GET", url, headers=headers), stream=True)
            second = client.send(client.build_request("GET", url, headers=headers), stream=True)
            # Each stream counts once its body runs: read its first line. (The line
            # iterators are kept: one that is garbage-collected closes its response.)
            readers = [response.iter_lines() for response in (first, second)]
            for response, reader in zip((first, second), readers, strict=True):
                assert response.status_code == 200
                assert next(reader).startswith("retry:")
            third = client.get(url, headers=headers)
            assert third.status_code == 429
            assert "at most 2" in third.json()["detail"]
            assert third.json()["trace_id"]
            first.close()

            def reopened() -> bool:
                request = client.build_request("GET", url, headers=headers)
                response = client.send(request, stream=True)
                try:
                    return response.status_code == 200
                finally:
                    response.close()

            # The closed one frees its place (once the server sees the disconnect).
            wait_for("a freed stream slot", reopened, timeout=10)
            second.close()
    finally:
        stop(api)
