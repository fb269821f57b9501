"""Webhooks (README, Webhooks). In-process: which URLs are taken at submit, the secret,
the signature as the `standardwebhooks` library verifies it. End to end: a receiver
on 127.0.0.1 that fails, then times out, then answers, and the webhook worker that
retries it under one webhook-id while the video itself is not held up."""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook

from kinora.jobs import webhooks
from tests.utils.accounts import Account, make_account
from tests.utils.inprocess import InProcessApi
from tests.utils.processes import Stack, kinora, start_api, stop, wait_for

PROMPT = "A heron standing in a misty river at dawn"


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1:9000/hook", "loopback, private or link-local"),
        ("http://10.1.2.3/hook", "loopback, private or link-local"),
        ("http://[::1]/hook", "loopback, private or link-local"),
        ("http://169.254.169.254/latest", "loopback, private or link-local"),
        ("http://localhost:8080/hook", "localhost"),
        ("http://LOCALHOST./hook", "localhost"),
        ("http://127.1/hook", "loopback, private or link-local"),
        ("http://2130706433/hook", "loopback, private or link-local"),
        ("http://0x7f000001/hook", "loopback, private or link-local"),
        ("http://0x7f.1/hook", "loopback, private or link-local"),
        ("http://0/hook", "loopback, private or link-local"),
        ("http://[::ffff:127.0.0.1]/hook", "loopback, private or link-local"),
        ("http://user@127.0.0.1/hook", "loopback, private or link-local"),
        ("ftp://example.com/hook", "http:// or https://"),
    ],
)
def test_a_private_or_odd_webhook_url_is_refused_at_submit(
    app: InProcessApi, account: Account, url: str, why: str
) -> None:
    with app.client(account) as client:
        response = client.post(
            "/api/v1/videos/generate", json={"prompt": PROMPT, "webhook_url": url}
        )
    assert response.status_code == 422
    assert response.json()["detail"].startswith("webhook_url: ")
    assert why in response.json()["detail"]


def test_a_public_name_is_taken_and_the_secret_verifies_a_signature(
    app: InProcessApi, account: Account
) -> None:
    with app.client(account) as client:
        created = client.post(
            "/api/v1/videos/generate",
            json={"prompt": PROMPT, "webhook_url": "https://hooks.invalid/kinora",
                  "webhook_events": ["completed", "started"]},
        )  # fmt: skip
        first = client.get("/api/v1/webhooks/secret").json()["secret"]
        again = client.get("/api/v1/webhooks/secret").json()["secret"]
    assert created.status_code == 202, created.text  # a name is resolved at delivery
    assert first == again
    assert first.startswith("whsec_")
    body = b'{"type":"video.completed"}'
    stamp = int(time.time())
    headers = {
        "webhook-id": "msg_video_1_completed",
        "webhook-timestamp": str(stamp),
        "webhook-signature": webhooks.sign(first, "msg_video_1_completed", stamp, body),
    }
    assert Webhook(first).verify(body, headers) == {"type": "video.completed"}


class Receiver:
    """A webhook receiver on 127.0.0.1: for each event type, the answers in `script`
    in turn (a status, or "hang" to answer only after the sender gave up); 200 for any
    other."""

    def __init__(self, script: dict[str, list[int | str]]) -> None:
        self.script = script
        self.got: list[tuple[dict[str, str], bytes, float]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with receiver.lock:
                    seen = sum(h["webhook-id"] == headers["webhook-id"] for h, _, _ in receiver.got)
                    receiver.got.append((headers, body, time.monotonic()))
                answers = receiver.script.get(json.loads(body)["type"], [200])
                answer = answers[min(seen, len(answers) - 1)]
                if answer == "hang":
                    time.sleep(2.5)  # longer than WEBHOOK_TIMEOUT_SECONDS
                    answer = 200
                self.send_response(int(answer))
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def of(self, event: str) -> list[tuple[dict[str, str], bytes, float]]:
        with self.lock:
            return [g for g in self.got if json.loads(g[1])["type"] == f"video.{event}"]


@pytest.fixture
def allowing(stack: Stack, environment: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """An API and a webhook worker that may post to 127.0.0.1 (the receiver), with a
    short retry and timeout; the stack's worker makes the videos."""
    env = {
        **environment,
        "WEBHOOK_ALLOW_PRIVATE": "true",
        "WEBHOOK_RETRY_SECONDS": "0.5",
        "WEBHOOK_TIMEOUT_SECONDS": "1",
    }
    api, base = start_api(env, tmp_path / "api.log")
    hooks = kinora("worker", "--webhooks", env=env, log=tmp_path / "webhooks.log")
    try:
        wait_for(
            "the webhook worker", lambda: b"ready." in (tmp_path / "webhooks.log").read_bytes(), 30
        )
        yield base
    finally:
        stop(hooks)
        stop(api)


def test_a_webhook_is_retried_until_it_is_answered_under_one_id(allowing: str) -> None:
    account = make_account()
    with (
        Receiver({"video.completed": [500, "hang", 200]}) as receiver,
        httpx.Client(base_url=allowing, headers=account.headers, timeout=30) as client,
    ):
        created = client.post(
            "/api/v1/videos/generate",
            json={"prompt": PROMPT, "webhook_url": receiver.url,
                  "webhook_events": ["started", "completed"]},
        ).json()  # fmt: skip
        video_id = created["video_id"]
        wait_for("the third delivery", lambda: len(receiver.of("completed")) == 3, timeout=60)
        secret = client.get("/api/v1/webhooks/secret").json()["secret"]
        listed = client.get(f"/api/v1/videos/{video_id}/webhooks").json()
        video = client.get(f"/api/v1/videos/{video_id}").json()

    assert video["status"] == "completed"
    started = receiver.of("started")
    assert len(started) == 1  # answered 200 at once
    completed = receiver.of("completed")
    assert len({h["webhook-id"] for h, _, _ in completed}) == 1  # receivers deduplicate
    for headers, body, _ in completed + started:
        payload = Webhook(secret).verify(body, headers)  # Standard Webhooks' own check
        assert payload["data"]["id"] == video_id
    last = json.loads(completed[-1][1])
    assert last["data"]["status"] == "completed"
    assert last["data"]["video_url"].startswith(f"/api/v1/videos/{video_id}/content?token=")
    assert set(last["data"]) >= set(video) - {"logs", "last_event_id"}  # the video as GET has it
    gaps = [later[2] - earlier[2] for earlier, later in itertools.pairwise(completed)]
    assert gaps[1] > gaps[0] * 0.9  # backoff: the waits grow (0.5 s, then 1 s, plus the hang)

    attempts = [a for a in listed["attempts"] if a["event"] == "completed"]
    assert [a["attempt"] for a in attempts] == [1, 2, 3]
    assert [a["status_code"] for a in attempts] == [500, None, 200]
    assert attempts[0]["error"] == "HTTP 500"
    assert attempts[1]["error"] == "unreachable: it did not answer in time"
    assert attempts[2]["error"] is None
    print("webhook delivery log:")
    for a in listed["attempts"]:
        print(f"  {a['event']:<9} attempt {a['attempt']} -> {a['status_code']} {a['error'] or ''}")


def test_a_retry_resends_the_same_message_and_retries_spread_out(allowing: str) -> None:
    """README, Webhooks: the `started` webhook of a video that then failed is retried with the
    bytes rendered when it started (`"status": "processing"` under its webhook-id, not
    the `failed` it has by the retry); and the retries of eight deliveries that failed
    at once do not come back at the same instant (jitter, as Celery's retry_jitter)."""
    account = make_account()
    with (
        Receiver({"video.started": [500, 200]}) as receiver,
        httpx.Client(base_url=allowing, headers=account.headers, timeout=30) as client,
    ):
        ids = [
            client.post(
                "/api/v1/videos/generate",
                json={"prompt": f"[mock:policy] refused {i}", "webhook_url": receiver.url,
                      "webhook_events": ["started", "failed"]},
            ).json()["video_id"]
            for i in range(8)
        ]  # fmt: skip
        wait_for(
            lambda: (
                f"two started deliveries of each of 8 videos (got {len(receiver.of('started'))})"
            ),
            lambda: len(receiver.of("started")) == 16,
            timeout=60,
        )
        wait_for("the failed webhooks", lambda: len(receiver.of("failed")) == 8, timeout=30)
    gaps = []
    for video_id in ids:
        tries = [g for g in receiver.of("started") if json.loads(g[1])["data"]["id"] == video_id]
        assert len(tries) == 2
        assert tries[0][1] == tries[1][1]  # the same bytes
        assert json.loads(tries[1][1])["data"]["status"] == "processing"
        gaps.append(tries[1][2] - tries[0][2])
    # WEBHOOK_RETRY_SECONDS is 0.5: each wait is drawn from 0.25-0.5 s.
    assert min(gaps) > 0.2, gaps
    assert max(gaps) - min(gaps) > 0.03, gaps


def test_a_webhook_to_a_name_that_resolves_inside_is_refused_at_delivery(
    stack: Stack, environment: dict[str, str], tmp_path: Path
) -> None:
    """This machine's own name is taken at submit (names are judged once resolved); the
    webhook worker resolves it, refuses it before connecting, and the attempts log says
    so without telling what the name resolves to."""
    account = make_account()
    hooks = kinora("worker", "--webhooks", env=environment, log=tmp_path / "webhooks.log")
    try:
        wait_for(
            "the webhook worker", lambda: b"ready." in (tmp_path / "webhooks.log").read_bytes(), 30
        )
        with Receiver({}) as receiver, stack.client(account) as client:
            url = receiver.url.replace("127.0.0.1", socket.gethostname())
            created = client.post(
                "/api/v1/videos/generate",
                json={"prompt": PROMPT, "webhook_url": url, "webhook_events": ["started"]},
            )
            assert created.status_code == 202, created.text
            video_id = created.json()["video_id"]

            def listed() -> list[dict[str, Any]]:
                got = client.get(f"/api/v1/videos/{video_id}/webhooks").json()["attempts"]
                return list(got)

            wait_for(lambda: f"the attempt recorded (got {listed()})", listed, timeout=30)
            (attempt,) = listed()
            assert receiver.got == []
    finally:
        stop(hooks)
    assert attempt["error"] == (
        "refused: its host is not a public address (set WEBHOOK_ALLOW_PRIVATE=true to allow)"
    )
    assert attempt["status_code"] is None
