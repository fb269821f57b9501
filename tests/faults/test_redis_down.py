"""Redis paused or gone (README, Faults): every request is answered within a few
seconds: a 503 with Retry-After when the answer needs Redis, never a 500 or a hang;
the video's state still comes from the database; and the first submit after Redis
is back is accepted."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from kinora.cli.embedded import EmbeddedRedis
from tests.utils.accounts import Account
from tests.utils.clients import close_code, pending_video
from tests.utils.processes import start_api, stop, wait_for

pytestmark = pytest.mark.slow

PROMPT = "A lighthouse keeper climbing the stairs at night"


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(tmp_path / "redis", persist=False) as server:
        yield server
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGCONT)


def timed(call: object) -> tuple[httpx.Response, float]:
    assert callable(call)
    started = time.monotonic()
    response = call()
    assert isinstance(response, httpx.Response)
    return response, time.monotonic() - started


def test_a_paused_redis_gets_503s_within_seconds_and_the_first_submit_after_is_accepted(
    environment: dict[str, str], account: Account, own_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    env = {**environment, "REDIS_URL": own_redis.url}
    api, base = start_api(env, tmp_path / "api.log")
    try:
        video = pending_video(account)
        with httpx.Client(base_url=base, headers=account.headers, timeout=15) as client:
            assert own_redis.process is not None
            os.kill(own_redis.process.pid, signal.SIGSTOP)
            # At once: the API has not noticed yet, so its Redis calls time out.
            submit, submit_took = timed(
                lambda: client.post("/api/v1/videos/generate", json={"prompt": PROMPT})
            )
            # Once its probe has noticed (a stream opened before that instant is a 200
            # that ends with `retry:` as soon as its subscription fails).
            wait_for("the API to notice", lambda: client.get("/readyz").status_code == 503, 10)
            stream, stream_took = timed(lambda: client.get(f"/api/v1/videos/{video}/stream"))
            read, read_took = timed(lambda: client.get(f"/api/v1/videos/{video}"))
            ready, ready_took = timed(lambda: client.get("/readyz"))
            os.kill(own_redis.process.pid, signal.SIGCONT)
            back = time.monotonic()
            accepted = client.post("/api/v1/videos/generate", json={"prompt": PROMPT})
            first_202 = time.monotonic() - back

        for response, took in ((submit, submit_took), (stream, stream_took)):
            assert response.status_code == 503, response.text
            assert int(response.headers["Retry-After"]) >= 1
            assert response.json()["detail"]
            assert response.json()["trace_id"]
            assert took < 7  # bounded Redis calls: seconds, not a hang
        assert "Redis" in stream.json()["detail"]
        assert read.status_code == 200  # the polling fallback answers from the database
        assert read.json()["status"] == "pending"
        assert read.json()["logs"] == []
        assert read_took < 7
        assert ready.status_code == 503
        assert ready_took < 7
        assert accepted.status_code == 202, accepted.text
        print(f"Redis back -> first 202 in {first_202:.2f} s")
    finally:
        stop(api)


def test_open_streams_end_with_a_retry_when_redis_is_killed(
    environment: dict[str, str], account: Account, tmp_path: Path
) -> None:
    """README, Faults: with Redis SIGKILLed under the API, an open stream does not idle on
    heartbeats until its 30-minute timeout: it ends within seconds with a `retry:`, in
    a complete response, so the client comes back (and polls meanwhile); a WebSocket
    is closed with 1013 (try again later)."""
    with EmbeddedRedis(tmp_path / "redis", persist=False) as server:
        # WebSocket pings at their defaults: the test's client does not answer them.
        env = environment | {"WS_PING_SECONDS": "30", "WS_PONG_TIMEOUT_SECONDS": "60"}
        api, base = start_api(env | {"REDIS_URL": server.url}, tmp_path / "api.log")
        try:
            video = pending_video(account)
            lines: list[str] = []
            ws_url = f"ws{base[4:]}/api/v1/projects/{video}/progress?token={account.token}"
            with (
                connect(ws_url, open_timeout=10) as ws,
                httpx.Client(timeout=httpx.Timeout(10, read=15)) as client,
                client.stream(
                    "GET", f"{base}/api/v1/videos/{video}/stream", headers=account.headers
                ) as response,
            ):
                assert response.status_code == 200
                stream = response.iter_lines()
                lines.append(next(stream))  # the opening retry:
                said = [json.loads(ws.recv(timeout=10))["event"] for _ in range(2)]
                time.sleep(3)  # both idle, their subscription live
                assert server.process is not None
                server.process.kill()
                killed = time.monotonic()
                for line in stream:  # ends when the server ends the response
                    lines.append(line)
                    if time.monotonic() - killed > 20:  # heartbeats only: it never ends
                        break
                ended = time.monotonic() - killed
                code = close_code(ws, within=10)
        finally:
            stop(api)
    assert said == ["connected", "initial_state"]
    retries = [line for line in lines if line.startswith("retry: ")]
    assert len(retries) == 2, lines
    assert ended < 10, f"the stream stayed open {ended:.1f} s after Redis died"
    assert code == 1013
    print(f"stream ended {ended:.2f} s after Redis was killed")
