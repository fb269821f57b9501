"""The API's cross-cutting behaviour: trace ids, error bodies, body size, rate limit,
CORS, and logs that never hold a token."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.utils.accounts import Account, make_account
from tests.utils.clients import events_of, read_stream
from tests.utils.processes import Stack, start_api, stop, wait_for

pytestmark = pytest.mark.slow

PROMPT = "A lighthouse at dusk, waves rolling in"


def test_every_response_has_a_trace_id_and_errors_quote_it(stack: Stack, account: Account) -> None:
    with stack.client(account) as client:
        ok = client.get("/api/v1/videos")
        missing = client.get("/api/v1/videos/987654321")
        invalid = client.post("/api/v1/videos/generate", json={"prompt": "short"})
        mine = client.get("/healthz", headers={"X-Request-Id": "lb-0123456789"})
    assert len(ok.headers["X-Trace-Id"]) == 36
    assert missing.json()["trace_id"] == missing.headers["X-Trace-Id"]
    assert invalid.status_code == 422
    assert invalid.json()["trace_id"] == invalid.headers["X-Trace-Id"]
    assert "prompt" in invalid.json()["detail"]
    assert mine.headers["X-Trace-Id"] == "lb-0123456789"  # a proxy's id is kept
    # The stream too (its header is set by the stream itself, not the middleware).
    from tests.utils.clients import pending_video

    video = pending_video(account)
    with (
        stack.client(account) as client,
        client.stream(
            "GET", f"/api/v1/videos/{video}/stream", headers={"X-Request-Id": "lb-stream-0001"}
        ) as stream,
    ):
        assert stream.headers["X-Trace-Id"] == "lb-stream-0001"


def test_the_stream_route_answers_as_the_api_does_whoever_serves_it(
    stack: Stack, account: Account
) -> None:
    """A video's stream is served in front of FastAPI's routing (api/front.py); its
    answers are the API's all the same: JSON errors with a trace id, HEAD, and the
    spellings of an id only FastAPI reads (refused or read as FastAPI does)."""
    from tests.utils.clients import pending_video

    video = pending_video(account)
    other = make_account()
    with (
        stack.client() as anonymous,
        stack.client(other) as stranger,
        stack.client(account) as client,
    ):
        nobody = anonymous.get(f"/api/v1/videos/{video}/stream")
        theirs = stranger.get(f"/api/v1/videos/{video}/stream")
        bad_resume = client.get(
            f"/api/v1/videos/{video}/stream", headers={"Last-Event-ID": "not-a-number"}
        )
        head = client.head(f"/api/v1/videos/{video}/stream")
        zero = client.get("/api/v1/videos/0/stream")
        padded = client.get(f"/api/v1/videos/0{video}/stream", params={"last_event_id": "x"})
        documented = client.get("/openapi.json").json()["paths"]
    assert nobody.status_code == 401
    assert nobody.headers["WWW-Authenticate"] == "Bearer"
    assert nobody.json()["trace_id"] == nobody.headers["X-Trace-Id"]
    assert theirs.status_code == 404
    assert "trace_id" in theirs.json()
    assert bad_resume.status_code == 400
    assert "Last-Event-ID" in bad_resume.json()["detail"]
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"].startswith("text/event-stream")
    assert zero.status_code == 422
    assert zero.json()["trace_id"]
    assert padded.status_code == 400  # FastAPI's route: the same video, the same check
    assert "/api/v1/videos/{video_id}/stream" in documented


def test_the_api_asks_the_kernel_for_the_largest_listen_backlog(stack: Stack) -> None:
    """A burst of new streams waits in the kernel's queue while the API is busy:
    uvicorn's 2,048 sent SYN cookies and lost connections in a burst of 10,000
    (bench.burst); `kinora api` asks for 65,535, which the kernel caps at somaxconn."""
    port = stack.base_url.rsplit(":", 1)[1]
    listening = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, timeout=10
    ).stdout.split()
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    assert int(listening[2]) == min(65535, somaxconn), listening  # Send-Q: the backlog


def test_a_body_over_the_limit_is_413_before_anything_is_charged(
    stack: Stack, account: Account
) -> None:
    huge = "A" * (16 * 1024 * 1024 + 1)
    with stack.client(account) as client:
        response = client.post(
            "/api/v1/videos/generate",
            content=b'{"prompt": "' + huge.encode() + b'"}',
            headers={"Content-Type": "application/json"},
        )

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            yield b'{"prompt": "'
            for _ in range(17):
                yield b"A" * 2**20
            yield b'"}'

        chunked = client.post(
            "/api/v1/videos/generate",
            content=chunks(),
            headers={"Content-Type": "application/json"},
        )
        videos = client.get("/api/v1/videos").json()
    for refused in (response, chunked):
        assert refused.status_code == 413
        assert "larger than 16 MB" in refused.json()["detail"]
    assert videos["total"] == 0


def test_generate_over_the_rate_limit_is_429_with_retry_after_for_that_user_only(
    stack: Stack,
) -> None:
    # No credits: each request is counted, none creates a video.
    broke, other = make_account(credits=0), make_account(credits=0)
    with stack.client(broke) as client:
        codes = [
            client.post("/api/v1/videos/generate", json={"prompt": PROMPT}).status_code
            for _ in range(30)
        ]
        limited = client.post("/api/v1/videos/generate", json={"prompt": PROMPT})
    with stack.client(other) as client:
        others = client.post("/api/v1/videos/generate", json={"prompt": PROMPT})
    assert codes == [402] * 30
    assert limited.status_code == 429
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert "try again in" in limited.json()["detail"]
    assert others.status_code == 402


def test_no_cross_origin_access_unless_configured(
    stack: Stack, environment: dict[str, str], var_dir: Path, account: Account
) -> None:
    from tests.utils.clients import pending_video

    video = pending_video(account)
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    closed = httpx.options(f"{stack.base_url}/api/v1/videos/generate", headers=preflight)
    assert "access-control-allow-origin" not in closed.headers

    env = {**environment, "CORS_ORIGINS": "https://app.example,https://other.example"}
    api, base = start_api(env, var_dir / "logs" / "api-cors.log")
    try:
        allowed = httpx.options(f"{base}/api/v1/videos/generate", headers=preflight)
        foreign = httpx.options(
            f"{base}/api/v1/videos/generate",
            headers={**preflight, "Origin": "https://evil.example"},
        )
        # A page's EventSource on another origin: the stream route too (api/front.py
        # leaves a cross-origin request to the app's CORS middleware).
        with httpx.stream(
            "GET",
            f"{base}/api/v1/videos/{video}/stream",
            headers={"Origin": "https://app.example", **account.headers},
            timeout=10,
        ) as cross:
            cross_headers = cross.headers
    finally:
        stop(api)
    assert cross_headers["content-type"].startswith("text/event-stream")
    assert cross_headers["access-control-allow-origin"] == "https://app.example"
    assert "x-trace-id" in cross_headers["access-control-expose-headers"].lower()
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-origin" not in foreign.headers


def test_a_job_logs_its_trace_id_and_no_token_is_ever_logged(
    stack: Stack, account: Account
) -> None:
    with stack.client(account) as client:
        created = client.post("/api/v1/videos/generate", json={"prompt": "[mock:policy] " + PROMPT})
    assert created.status_code == 202
    trace_id = created.headers["X-Trace-Id"]
    body = created.json()
    scoped = body["stream_url"].split("token=")[1]
    # The token in every place a client may put it: query, header, scoped.
    _, lines = read_stream(body["stream_url"], timeout=30)
    read_stream(
        f"{stack.base_url}/api/v1/videos/{body['video_id']}/stream?token={account.token}",
        timeout=30,
    )
    read_stream(
        f"{stack.base_url}/api/v1/videos/{body['video_id']}/stream", headers=account.headers
    )
    error = next(e for e in events_of(lines) if e["type"] == "error")
    assert error["trace_id"] == trace_id

    worker_log = stack.logs / "worker.log"
    tagged = f"video_id={body['video_id']} trace_id={trace_id}"
    wait_for("the worker's log lines", lambda: tagged in worker_log.read_text(), timeout=10)
    api_log = stack.logs / "api.log"
    stream_path = f"/api/v1/videos/{body['video_id']}/stream"
    wait_for("the stream's access line", lambda: stream_path in api_log.read_text(), timeout=10)
    for name in ("api.log", "worker.log"):
        text = (stack.logs / name).read_text()
        assert account.token not in text, f"API token in {name}"
        assert scoped not in text, f"scoped token in {name}"
    job_lines = [
        line
        for line in worker_log.read_text().splitlines()
        if f"video_id={body['video_id']} " in line
    ]
    assert job_lines
    assert all(trace_id in line for line in job_lines)


def test_urls_use_the_public_scheme_and_host_a_trusted_proxy_forwards(
    stack: Stack, account: Account
) -> None:
    from tests.utils.clients import pending_video

    video = pending_video(account)
    with stack.client(account) as client:
        proxied = client.get(
            f"/api/v1/videos/{video}",
            headers={"X-Forwarded-Proto": "https", "Host": "videos.example"},
        ).json()
        direct = client.get(f"/api/v1/videos/{video}").json()
    assert proxied["stream_url"].startswith(f"https://videos.example/api/v1/videos/{video}/")
    assert direct["stream_url"].startswith(f"{stack.base_url}/api/v1/videos/{video}/")
