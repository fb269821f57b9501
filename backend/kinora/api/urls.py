"""The URLs the API hands out: absolute, built from the request (so they carry the
public scheme and host behind a proxy), each with a token scoped to its one video."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

import orjson
from fastapi import Request
from starlette.requests import HTTPConnection

from kinora.core.models import Video, VideoStatus
from kinora.core.tokens import sign_scoped
from kinora.jobs.lifecycle import content_path
from kinora.streaming.frames import Item


def stream_url(request: Request, video_id: int, user_id: int) -> str:
    url = request.url_for("stream_video", video_id=video_id)
    return f"{url}?token={sign_scoped(video_id, user_id)}"


def http_base(connection: HTTPConnection) -> str:
    """The base URL the client used (its root path behind a proxy included); over
    http(s) for a WebSocket's client too, which fetches videos with it."""
    base = str(connection.base_url).rstrip("/")
    return "http" + base[2:] if base.startswith("ws") else base


def content_url(
    connection: HTTPConnection, video: Video, what: Literal["content", "thumbnail"] = "content"
) -> str | None:
    """The `video_url` of the `complete` event (lifecycle.content_path), made absolute
    against the URL the client used."""
    if video.status != VideoStatus.COMPLETED:
        return None
    return http_base(connection) + content_path(video.id, video.user_id, what)


class FreshEnds:
    """A video's `complete` event as it is sent, its `video_url` signed then (README,
    Faults): the history keeps an event for 24 h, its token lives an hour. One signing serves
    every stream that sends the same end on the same host within a minute (ten thousand
    watchers of a video end together)."""

    TTL_SECONDS = 60.0

    def __init__(self) -> None:
        self._signed: dict[tuple[int, int, str], tuple[float, Item]] = {}
        self._bases: dict[tuple[Any, ...], str] = {}

    def finisher(self, connection: HTTPConnection, video: Video) -> Callable[[Item], Item]:
        return Finisher(self, self.base(connection), video)

    def base(self, connection: HTTPConnection) -> str:
        """`http_base(connection)`, made once for every connection that reaches this
        host the same way (a reconnect storm's streams: one string, not one each)."""
        scope = connection.scope
        # What Starlette's base_url reads.
        key = (
            scope["scheme"], scope.get("server"), scope.get("app_root_path"),
            scope.get("root_path"), connection.headers.get("host"),
        )  # fmt: skip
        base = self._bases.get(key)
        if base is None:
            if len(self._bases) >= 64:  # a client sending ever new Host headers
                self._bases.clear()
            base = self._bases[key] = http_base(connection)
        return base

    def get(self, base: str, video: Video, item: Item) -> Item:
        now = time.monotonic()
        key = (video.id, item.seq, base)
        cached = self._signed.get(key)
        if cached is not None and now - cached[0] < self.TTL_SECONDS:
            return cached[1]
        event = item.event
        if event.get("status") != "completed" or "video_url" not in event:
            return item
        event["video_url"] = base + content_path(video.id, video.user_id)
        fresh = Item(orjson.dumps(event), item.seq, item.type)
        if len(self._signed) > 4096:
            self._signed = {k: v for k, v in self._signed.items() if now - v[0] < self.TTL_SECONDS}
        self._signed[key] = (now, fresh)
        return fresh


class Finisher:
    """A stream's `complete`, made as it is sent (FreshEnds.get). (A class, not a
    closure: every open stream holds one.)"""

    __slots__ = ("base", "ends", "video")

    def __init__(self, ends: FreshEnds, base: str, video: Video) -> None:
        self.ends, self.base, self.video = ends, base, video

    def __call__(self, item: Item) -> Item:
        return self.ends.get(self.base, self.video, item)
