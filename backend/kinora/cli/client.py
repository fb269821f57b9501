"""The terminal client behind `kinora generate` and `kinora watch`: submits over HTTP,
reads the SSE stream, and resumes with `Last-Event-ID` after a dropped connection."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx

from kinora.streaming.events import Event, parse

RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 5.0)  # then every 5 s


class ClientError(Exception):
    """A refusal from the server, in one line."""


class NotAllowed(ClientError):
    """401, 403 or 404: the token, or the video, is not good."""


class Unreachable(ClientError):
    """The server cannot be reached (or stopped answering for good)."""


# Without a single answer from the server for this long, `watch` gives up at once.
FIRST_CONNECT_SECONDS = 10.0


def refusal(response: httpx.Response) -> ClientError:
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = response.text[:200]
    kind = NotAllowed if response.status_code in (401, 403, 404) else ClientError
    return kind(f"{response.status_code}: {detail}")


def check_url(url: str) -> str:
    """The server's URL, or ValueError saying what is wrong with it."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"{url!r} is not a URL ({exc})") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(
            f"{url!r} needs http:// or https:// and a host, e.g. http://127.0.0.1:8000"
        )
    return url.rstrip("/")


class KinoraClient:
    def __init__(self, base_url: str, token: str, *, give_up_after: float = 300.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.give_up_after = give_up_after
        self.http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(30.0, read=60.0),  # a heartbeat comes every 15 s
        )

    def close(self) -> None:
        self.http.close()

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST generate; a dropped connection is retried with the same
        Idempotency-Key, so it can never make two videos."""
        headers = {"Idempotency-Key": f"cli-{uuid.uuid4()}"}
        for delay in (*RETRY_DELAYS, None):
            try:
                response = self.http.post("/api/v1/videos/generate", json=body, headers=headers)
                break
            except httpx.TransportError as exc:
                if delay is None:
                    raise Unreachable(f"cannot reach {self.base_url}: {exc}") from exc
                time.sleep(delay)
        if response.status_code != 202:
            raise refusal(response)
        result: dict[str, Any] = response.json()
        return result

    def video(self, video_id: int) -> dict[str, Any]:
        try:
            response = self.http.get(f"/api/v1/videos/{video_id}")
        except httpx.TransportError as exc:
            raise Unreachable(f"cannot reach {self.base_url}: {exc}") from exc
        if response.status_code != 200:
            raise refusal(response)
        result: dict[str, Any] = response.json()
        return result

    def events(self, video_id: int) -> Iterator[Event]:
        """Every event of the video, from the first, until `complete`, across dropped
        connections (each reconnect sends the last id seen). Unreachable at once if the
        server never answers in FIRST_CONNECT_SECONDS; after it has, only once it has
        been gone for `give_up_after`."""
        last_id: str | None = None
        failures = 0
        down_since: float | None = time.monotonic()
        connected = False
        while True:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                with self.http.stream(
                    "GET", f"/api/v1/videos/{video_id}/stream", headers=headers
                ) as response:
                    if response.status_code == 204:
                        return  # the stream had ended and we have every event
                    if response.status_code != 200:
                        response.read()
                        raise refusal(response)
                    failures, down_since, connected = 0, None, True
                    for event in sse_events(response.iter_lines()):
                        last_id = event["id"]
                        yield event
                        if event["type"] == "complete":
                            return
            except httpx.TransportError as exc:
                now = time.monotonic()
                down_since = down_since or now
                if not connected and now - down_since > FIRST_CONNECT_SECONDS:
                    raise Unreachable(
                        f"cannot reach {self.base_url}: {exc}. Is the server running "
                        "(`kinora up`), and is KINORA_URL / --url its address?"
                    ) from exc
                if now - down_since > self.give_up_after:
                    raise Unreachable(
                        f"lost the stream of video {video_id} and could not resume: {exc}"
                    ) from exc
                time.sleep(RETRY_DELAYS[min(failures, len(RETRY_DELAYS) - 1)])
                failures += 1
            # a response that ended without `complete` (SSE_TIMEOUT_SECONDS): resume


def sse_events(lines: Iterator[str]) -> Iterator[Event]:
    """Events from SSE lines: `data:` lines joined until a blank line; comments,
    `id:` and `retry:` lines need nothing (the id is inside the JSON)."""
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield parse("\n".join(data))
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
