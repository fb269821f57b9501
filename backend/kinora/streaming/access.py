"""What a stream's token allows, and until when (README, Faults, "Tokens end").

A stream opened with a token that expires (a video's scoped `stream_url`) ends when
it does; a stream whose token is revoked (the host decides: Kinora when the user's API
token is rotated) ends within seconds. Either way it ends with a last notice that says
why, and no new `retry:` line: reconnecting with the same token would only meet a 401.
The notice is a `log` event with `code` `token_expired` or `token_revoked` and no
`id:` (it is not one of the job's events, and the client's place in the stream stays
where it was); `kinora-progress.js` stops on it and tells the page, which fetches a
new URL (or signs out).
"""

from __future__ import annotations

from typing import Literal

import orjson

from kinora.streaming.events import timestamp
from kinora.streaming.keys import StreamKey
from kinora.streaming.watcher import Watcher

Ended = Literal["expired", "revoked"]
CODES: dict[Ended, str] = {"expired": "token_expired", "revoked": "token_revoked"}
MESSAGES: dict[Ended, str] = {
    "expired": "This stream's access expired: fetch the job again for a new stream URL",
    "revoked": "This stream's access was revoked (the API token was rotated): sign in again",
}


class Access:
    """One stream's access: `expires` (epoch seconds) if its token expires, and `end`
    for the host to revoke it. The watchers attached end with it."""

    __slots__ = ("_watchers", "ended", "expires")

    def __init__(self, expires: float | None = None) -> None:
        self.expires = expires
        self.ended: Ended | None = None
        # A list: a stream of one job attaches one watcher (an empty set is 216 bytes,
        # and every open stream holds its access), a stream of several a few.
        self._watchers: list[Watcher] = []

    def attach(self, watcher: Watcher) -> None:
        if watcher not in self._watchers:
            self._watchers.append(watcher)
        if self.ended is not None:
            watcher.end(self.ended)

    def detach(self, watcher: Watcher) -> None:
        if watcher in self._watchers:
            self._watchers.remove(watcher)

    def expire(self) -> None:
        self.end("expired")

    def end(self, why: Ended) -> None:
        if self.ended is None:
            self.ended = why
            for watcher in list(self._watchers):
                watcher.end(why)


def notice(key: StreamKey | None, why: Ended) -> dict[str, object]:
    """The last event of a stream whose access ended (`key`: its job; None for a
    stream of several jobs)."""
    return {
        **({key.id_field: key.id} if key is not None else {}),
        "type": "log",
        "code": CODES[why],
        "message": MESSAGES[why],
        "timestamp": timestamp(),
    }


def sse_notice(key: StreamKey | None, why: Ended) -> bytes:
    return b"data: %s\n\n" % orjson.dumps(notice(key, why))
