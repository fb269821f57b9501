"""One event as the hub carries it, framed once per transport however many clients
receive it: the SSE frame (docs/protocol.md §2) and the WebSocket message (§5)."""

from __future__ import annotations

import orjson

from kinora.streaming.events import Event, parse

# The WebSocket name of each event type (docs/protocol.md §3).
WS_EVENT_NAMES = {"progress": "progress_update", "stage": "stage_change"}


class Item:
    """One event as the hub carries it: parsed once, framed once per transport."""

    __slots__ = ("_sse", "_ws", "raw", "seq", "type")

    def __init__(self, raw: bytes, seq: int, type_: str) -> None:
        self.raw = raw
        self.seq = seq
        self.type = type_
        self._sse: bytes | None = None
        self._ws: str | None = None

    @classmethod
    def from_raw(cls, raw: bytes) -> Item:
        data = orjson.loads(raw)
        return cls(raw, int(data["seq"]), str(data["type"]))

    @property
    def event(self) -> Event:
        return parse(self.raw)

    @property
    def terminal(self) -> bool:
        return self.type == "complete"

    @property
    def ws(self) -> str:
        """The WebSocket message (docs/protocol.md §3), built once per event."""
        if self._ws is None:
            name = WS_EVENT_NAMES.get(self.type, self.type)
            self._ws = f'{{"event":"{name}","data":{self.raw.decode()}}}'
        return self._ws

    @property
    def sse(self) -> bytes:
        """The SSE frame, built once per event however many clients receive it."""
        if self._sse is None:
            self._sse = b"id: %d\ndata: %s\n\n" % (self.seq, self.raw)
        return self._sse


# Put in a topic's log after the subscriber reconnected: its watchers re-read history.
RESYNC = Item(b"{}", -1, "resync")
