"""The SSE stream end to end: real Redis, real Celery worker, the API under uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import re
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import av
import httpx
import psutil
import pytest
import redis

from kinora.core.db import session_scope
from kinora.core.models import User, Video
from kinora.core.tokens import sign_scoped
from kinora.jobs import store
from kinora.streaming import keys
from kinora.streaming.logger import SSELogger
from tests.utils.accounts import Account, make_account
from tests.utils.clients import assert_whole_generation, events_of, ids_of, read_stream, submit
from tests.utils.processes import Stack, start_api, stop, wait_for

pytestmark = pytest.mark.slow


def test_stream_carries_every_step_and_the_video_plays(stack: Stack, account: Account) -> None:
    created = submit(stack, account, "A lighthouse in a storm, waves crashing")
    assert created["status"] == "pending"
    assert created["credits_remaining"] == 900
    assert "token=kvs2." in created["stream_url"]  # a scoped token, never the API token
    assert account.token not in created["stream_url"]

    status, lines = read_stream(created["stream_url"])

    assert status == 200
    assert lines[0] == "retry: 3000"
    # (`: ping` comes only while a stream is idle: see the heartbeat test below.)
    events = events_of(lines)
    assert_whole_generation(events)
    assert ids_of(lines) == [e["id"] for e in events]
    assert all(e["video_id"] == created["video_id"] for e in events)

    with stack.client() as client:
        response = client.get(events[-1]["video_url"])
        assert response.status_code == 200
        assert response.headers["content-type"] == "video/mp4"
        body = response.content
        assert body[4:8] == b"ftyp"
        with av.open(io.BytesIO(body), "r") as container:
            frames = list(container.decode(video=0))
        assert (frames[0].width, frames[0].height) == (1280, 720)
        assert len(frames) == 4 * 24

        partial = client.get(events[-1]["video_url"], headers={"Range": "bytes=0-99"})
        assert partial.status_code == 206
        assert partial.content == body[:100]

    with stack.client(account) as client:
        video = client.get(f"/api/v1/videos/{created['video_id']}").json()
    assert video["status"] == "completed"
    assert video["progress"] == 100
    assert video["last_event_id"] == events[-1]["id"]
    assert video["logs"] == events
    assert video["video_url"].startswith(stack.base_url)


def test_curl_prints_every_event_and_exits_by_itself(stack: Stack, account: Account) -> None:
    created = submit(stack, account, "A paper boat drifting down a rainy street")
    result = subprocess.run(
        ["curl", "-sSN", "--max-time", "60", created["stream_url"]],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert_whole_generation(events_of(result.stdout.splitlines()))


def test_resume_with_last_event_id_gets_exactly_the_rest(stack: Stack, account: Account) -> None:
    created = submit(stack, account, "Time-lapse of a city skyline from dusk to night")
    url = created["stream_url"]
    _, first = read_stream(url, limit=5)
    assert [e["seq"] for e in events_of(first)] == [1, 2, 3, 4, 5]

    _, rest = read_stream(url, headers={"Last-Event-ID": ids_of(first)[-1]})

    events = events_of(first) + events_of(rest)
    assert_whole_generation(events)

    # curl cannot set the header from a previous response: ?last_event_id= works too
    _, tail = read_stream(f"{url}&last_event_id=3")
    assert [e["seq"] for e in events_of(tail)] == [e["seq"] for e in events[3:]]


def test_late_client_gets_the_history_then_the_end_then_204(stack: Stack, account: Account) -> None:
    created = submit(stack, account, "A hummingbird hovering over a red flower")
    _, live = read_stream(created["stream_url"])

    _, late = read_stream(created["stream_url"])
    assert events_of(late) == events_of(live)

    last_id = ids_of(live)[-1]
    status, _ = read_stream(created["stream_url"], headers={"Last-Event-ID": last_id})
    assert status == 204  # EventSource stops reconnecting


def test_malformed_last_event_id_is_400(stack: Stack, account: Account) -> None:
    created = submit(stack, account, "Snow falling on a quiet mountain village")
    for bad in ("abc", "-1", "1.5", "9" * 30):
        response = httpx.get(created["stream_url"], headers={"Last-Event-ID": bad}, timeout=10)
        assert response.status_code == 400, bad
        assert "Last-Event-ID" in response.json()["detail"]


def redis_connections(process: subprocess.Popen[bytes], redis_port: int) -> int:
    conns = psutil.Process(process.pid).net_connections(kind="tcp")
    return sum(1 for c in conns if c.raddr and c.raddr.port == redis_port)


def subscribers(client: redis.Redis, video_id: int) -> int:
    counts: list[Any] = client.pubsub_numsub(f"video:{video_id}")
    return int(counts[0][1])


def warm_up(stack: Stack, account: Account, video_id: int) -> None:
    """Open the API's small Redis command pool to its full size, so that the
    connection count before and after a test can be compared exactly."""

    async def hit() -> None:
        async with httpx.AsyncClient(base_url=stack.base_url, headers=account.headers) as client:
            await asyncio.gather(
                *(client.get(f"/api/v1/videos/{video_id}", timeout=10) for _ in range(20))
            )

    asyncio.run(hit())


def test_fifty_clients_at_once_receive_identical_sequences(
    stack: Stack, account: Account, redis_client: redis.Redis, environment: dict[str, str]
) -> None:
    redis_port = int(environment["REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
    created = submit(stack, account, "Fifty people watching one sunrise over the sea")
    video_id = created["video_id"]
    warm_up(stack, account, video_id)
    before = redis_connections(stack.api, redis_port)

    async def watch(client: httpx.AsyncClient, start: asyncio.Event) -> list[int]:
        await start.wait()
        seqs: list[int] = []
        async with client.stream("GET", created["stream_url"]) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    seqs.append(events_of([line])[0]["seq"])
        return seqs

    async def all_at_once() -> list[list[int]]:
        limits = httpx.Limits(max_connections=60)
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(30)) as client:
            start = asyncio.Event()
            tasks = [asyncio.create_task(watch(client, start)) for _ in range(50)]
            await asyncio.sleep(0.1)
            start.set()
            async with asyncio.timeout(90):
                return await asyncio.gather(*tasks)

    results = asyncio.run(all_at_once())

    assert len(results) == 50
    assert results[0] == list(range(1, len(results[0]) + 1))
    assert len(results[0]) >= 15
    assert all(r == results[0] for r in results)
    wait_for("no subscriber left", lambda: subscribers(redis_client, video_id) == 0, timeout=10)
    wait_for(
        "the API's Redis connections back to where they were",
        lambda: redis_connections(stack.api, redis_port) == before,
        timeout=10,
    )


def test_the_api_holds_three_redis_connections_while_it_streams_and_queues(
    stack: Stack, environment: dict[str, str]
) -> None:
    """At most three Redis connections per API process (the hub's subscriber and
    command connection, and one to queue jobs), however many requests stream, submit
    and cancel at once."""
    account = make_account(credits=2000)
    redis_port = int(environment["REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
    watched = submit(stack, account, "Ten people watching a kite over the dunes")
    seen: list[int] = []
    done = False

    def sample() -> None:
        while not done:
            seen.append(redis_connections(stack.api, redis_port))
            time.sleep(0.02)

    async def watch(client: httpx.AsyncClient) -> int:
        events = 0
        async with client.stream("GET", watched["stream_url"]) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                events += line.startswith("data: ")
        return events

    async def everything_at_once() -> tuple[list[int], list[int]]:
        async with httpx.AsyncClient(
            base_url=stack.base_url, headers=account.headers, timeout=httpx.Timeout(60)
        ) as client:
            streams = [asyncio.create_task(watch(client)) for _ in range(10)]
            submits = await asyncio.gather(
                *(
                    client.post("/api/v1/videos/generate", json={"prompt": f"Kite number {n}"})
                    for n in range(12)
                )
            )
            assert all(r.status_code == 202 for r in submits), [r.text for r in submits]
            cancels = await asyncio.gather(
                *(client.post(f"/api/v1/videos/{r.json()['video_id']}/cancel") for r in submits[:6])
            )
            async with asyncio.timeout(90):
                return await asyncio.gather(*streams), [r.status_code for r in cancels]

    with ThreadPoolExecutor(1) as sampler:
        sampling = sampler.submit(sample)
        try:
            events, cancelled = asyncio.run(everything_at_once())
        finally:
            done = True
            sampling.result(timeout=10)
    assert all(n >= 10 for n in events), events  # every stream ran to `complete`
    assert cancelled == [200] * 6
    assert len(seen) > 10
    assert 2 <= max(seen) <= 3, seen


def unqueued_video(account: Account) -> Video:
    """A video of `account` that no worker will take: the test publishes its events."""
    with session_scope() as session:
        user = session.get(User, account.id)
        assert user is not None
        video, _ = store.create_video(
            session, user, prompt="never queued", parameters={}, cost=0, task_id="none"
        )
        return video


def first_chunk(base_url: str, path: str, headers: dict[str, str]) -> bytes:
    """The first chunk of a stream's body, as the server wrote it (one write, one
    chunk of its chunked encoding), read off a raw socket within 10 s."""
    host, port = base_url.removeprefix("http://").split(":")
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{lines}\r\n".encode())
        received = b""
        while True:
            head, sep, body = received.partition(b"\r\n\r\n")
            if sep:
                assert b" 200 " in head.split(b"\r\n", 1)[0], head
                size, crlf, rest = body.partition(b"\r\n")
                if crlf and len(rest) >= int(size, 16):
                    return rest[: int(size, 16)]
            data = conn.recv(1 << 16)
            assert data, received
            received += data


def test_a_resuming_stream_gets_its_retry_and_missed_events_in_one_write(
    stack: Stack, account: Account
) -> None:
    """docs/protocol.md §2: the stream opens with `retry:`. A client that resumes gets it
    in one write with every event it missed (a reconnect storm's streams each cost one
    write less); with nothing to catch up on, `retry:` comes alone, at once."""
    video = unqueued_video(account)
    path = f"/api/v1/videos/{video.id}/stream?token={account.token}"
    retry = re.compile(rb"retry: \d+\n\n")
    assert retry.fullmatch(first_chunk(stack.base_url, path, {}))
    with SSELogger(keys.video(video.id)) as log:
        for i in range(5):
            log.step(i, f"step {i}", progress=i * 10)
    assert retry.fullmatch(first_chunk(stack.base_url, path, {"Last-Event-ID": "5"}))

    chunk = first_chunk(stack.base_url, path, {"Last-Event-ID": "2"})
    opening = retry.match(chunk)
    assert opening is not None, chunk
    rest = chunk[opening.end() :].decode().splitlines()
    assert ids_of(rest) == ["3", "4", "5"], chunk
    assert [e["message"] for e in events_of(rest)] == ["step 2", "step 3", "step 4"]


def test_an_idle_stream_has_the_contract_headers_and_a_heartbeat_every_interval(
    stack: Stack, account: Account
) -> None:
    """docs/protocol.md §2: `text/event-stream`, `Cache-Control: no-cache`, `X-Accel-Buffering:
    no`, and `: ping` every SSE_PING_SECONDS (0.5 here) while nothing happens."""
    video = unqueued_video(account)
    url = f"{stack.base_url}/api/v1/videos/{video.id}/stream"
    pings: list[float] = []
    with (
        httpx.Client(timeout=httpx.Timeout(5, read=3)) as client,
        client.stream("GET", url, headers=account.headers) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        started = time.monotonic()
        for line in response.iter_lines():
            if line == ": ping":
                pings.append(time.monotonic() - started)
            if len(pings) == 4:
                break
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert all(0.3 < gap < 1.5 for gap in gaps), pings


def test_clients_that_disconnect_leave_no_subscription(
    stack: Stack, account: Account, redis_client: redis.Redis, environment: dict[str, str]
) -> None:
    # A video that stays pending (never queued): its streams stay open and idle.
    video = unqueued_video(account)
    url = f"{stack.base_url}/api/v1/videos/{video.id}/stream?token={account.token}"
    redis_port = int(environment["REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
    warm_up(stack, account, video.id)
    before = redis_connections(stack.api, redis_port)

    async def open_and_drop() -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10)) as client:
            streams = [client.stream("GET", url) for _ in range(10)]
            responses = [await s.__aenter__() for s in streams]
            assert all(r.status_code == 200 for r in responses)
            # every stream is live: the retry line and a heartbeat have arrived
            for response in responses:
                async with asyncio.timeout(5):
                    async for line in response.aiter_lines():
                        if line == ": ping":
                            break
            assert subscribers(redis_client, video.id) == 1  # ten watchers, one subscription
            for s in streams:
                await s.__aexit__(None, None, None)

    asyncio.run(open_and_drop())

    wait_for("no subscriber left", lambda: subscribers(redis_client, video.id) == 0, timeout=10)
    wait_for(
        "the API's Redis connections back to where they were",
        lambda: redis_connections(stack.api, redis_port) == before,
        timeout=10,
    )


def read_to_the_end(url: str) -> list[dict[str, Any]]:
    """A reading client, as EventSource is: should a loaded machine let it fall too far
    behind too, it resumes with Last-Event-ID (never a gap, never a repeat)."""
    events: list[dict[str, Any]] = []
    for _ in range(5):
        headers = {"Last-Event-ID": str(events[-1]["seq"])} if events else None
        status, lines = read_stream(url, headers=headers, timeout=60)
        assert status == 200
        events += events_of(lines)
        if events and events[-1]["type"] == "complete":
            break
    return events


def test_a_client_that_stops_reading_is_cut_off_without_slowing_others_and_resumes(
    stack: Stack, account: Account
) -> None:
    """STREAM_QUEUE_SIZE is 64 here: a client that stops reading is cut off once it
    is that far behind, while another client of the same video gets every event;
    the cut client then resumes with Last-Event-ID and has lost nothing."""
    video = unqueued_video(account)
    path = f"/api/v1/videos/{video.id}/stream?token={account.token}"
    url = stack.base_url + path
    host, port = stack.base_url.removeprefix("http://").split(":")

    def watching() -> int:
        response = httpx.get(
            f"{url.split('/stream')[0]}/connections", headers=account.headers, timeout=10
        )
        return int(response.json()["connections"])

    # The slow client: a small receive window, and it reads nothing after connecting.
    with socket.socket() as slow:
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.settimeout(10)
        slow.connect((host, int(port)))
        slow.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        wait_for("the slow client watching", lambda: watching() == 1, timeout=10)

        total = 1500  # 2 KB each: far more than the socket buffers hold
        with ThreadPoolExecutor(1) as pool:
            fast = pool.submit(read_to_the_end, url)
            wait_for("both clients watching", lambda: watching() == 2, timeout=10)
            with SSELogger(keys.video(video.id)) as log:
                for i in range(total - 1):
                    log.step(5, f"step {i} " + "x" * 2000, progress=i * 100 // total)
                log.complete(video_url="/media/1.mp4")
            events = fast.result(timeout=90)

        # The reading client got everything, in order, while the other read nothing.
        assert [e["seq"] for e in events] == list(range(1, total + 1))
        # The slow one was cut off (it no longer counts), its memory let go.
        wait_for("the slow client cut off", lambda: watching() == 0, timeout=10)

        # What it reads now is what was written before the cut; then the response ends.
        received = b""
        deadline = time.monotonic() + 30
        with contextlib.suppress(ConnectionError):
            while chunk := slow.recv(1 << 16):
                received += chunk
                assert time.monotonic() < deadline, "the cut client's response never ended"
    seqs = [int(line[4:]) for line in received.split(b"\n") if line.startswith(b"id: ")]
    assert seqs == list(range(1, len(seqs) + 1))
    assert 0 < len(seqs) < total  # cut before the end

    status, rest = read_stream(url, headers={"Last-Event-ID": str(seqs[-1])})
    assert status == 200
    assert [e["seq"] for e in events_of(rest)] == list(range(len(seqs) + 1, total + 1))
    assert events_of(rest)[-1]["type"] == "complete"


def test_a_client_that_never_reads_again_gives_back_its_stream_slot(
    account: Account, environment: dict[str, str], var_dir: Path
) -> None:
    """A client that stops reading for good is disconnected after
    SSE_SEND_TIMEOUT_SECONDS, and the stream it held no longer counts against its
    user's cap: with MAX_STREAMS_PER_USER=1, the user can watch again."""
    video = unqueued_video(account)
    env = environment | {"MAX_STREAMS_PER_USER": "1", "SSE_SEND_TIMEOUT_SECONDS": "2"}
    api_log = var_dir / "api-stall.log"
    api, base = start_api(env, api_log)
    try:
        host, port = base.removeprefix("http://").split(":")
        path = f"/api/v1/videos/{video.id}/stream?token={account.token}"
        with socket.socket() as stalled:
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stalled.connect((host, int(port)))
            stalled.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            # Its stream is open (and holds the user's one slot) once its first line came:
            # a probe sent before that could take the slot itself.
            stalled.settimeout(10)
            head = b""
            while b"retry:" not in head:
                chunk = stalled.recv(4096)
                assert chunk, head
                head += chunk
            assert b" 200 " in head.split(b"\r\n", 1)[0], head
            seen: list[str] = []

            def capped() -> bool:
                with httpx.stream("GET", base + path, timeout=5) as response:
                    seen.append(str(response.status_code))
                    return response.status_code == 429

            wait_for(
                lambda: f"the cap reached (answers: {seen}; API: {api_log.read_text()[-3000:]})",
                capped,
                timeout=10,
            )
            with SSELogger(
                keys.video(video.id)
            ) as log:  # 8 MB: far more than the socket buffers hold
                for i in range(1000):
                    log.step(5, f"step {i} " + "x" * 8000, progress=i // 10)

            def watchable() -> bool:
                with httpx.stream("GET", base + path, timeout=5) as response:
                    return response.status_code == 200

            wait_for("the stalled client's slot given back", watchable, timeout=20)
    finally:
        stop(api)


def test_a_shared_stream_url_has_any_audience_while_the_api_token_is_capped(
    account: Account, environment: dict[str, str], var_dir: Path
) -> None:
    """MAX_STREAMS_PER_USER counts API tokens, not audiences (README, Settings): with a cap of
    1 and the owner's one stream open, five viewers of the shared scoped link all get
    their stream, and the owner's second API-token stream is the one refused."""
    video = unqueued_video(account)
    api, base = start_api(environment | {"MAX_STREAMS_PER_USER": "1"}, var_dir / "api-audience.log")
    path = f"{base}/api/v1/videos/{video.id}/stream"
    shared = f"{path}?token={sign_scoped(video.id, account.id)}"
    try:
        with contextlib.ExitStack() as streams, httpx.Client(timeout=10) as client:
            owner = streams.enter_context(client.stream("GET", path, headers=account.headers))
            assert owner.status_code == 200
            viewers = [streams.enter_context(client.stream("GET", shared)) for _ in range(5)]
            assert [v.status_code for v in viewers] == [200] * 5
            second = client.get(path, headers=account.headers)
            assert second.status_code == 429, second.text
            assert "API token" in second.json()["detail"]
    finally:
        stop(api)
