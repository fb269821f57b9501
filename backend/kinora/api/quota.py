"""How many streams (SSE and WebSocket) one API token may hold open at once in one API
process: a client in a reconnect loop, or a script that opens streams and never reads,
cannot take a process's memory from everyone else (README, Settings and Faults).

The cap counts API tokens, not audiences: a stream opened with a video's scoped
`stream_url` (a link its owner may share with any number of viewers) counts against no
one, and its holder is None here."""

from __future__ import annotations

from collections import Counter

from fastapi import HTTPException, status


class StreamQuota:
    def __init__(self, limit: int) -> None:
        self.limit = limit  # 0: no limit
        self.open: Counter[int] = Counter()

    def full(self, holder: int | None) -> bool:
        return holder is not None and bool(self.limit) and self.open[holder] >= self.limit

    def check(self, holder: int | None) -> None:
        """429 when the user holds `limit` streams already."""
        if self.full(holder):
            assert holder is not None
            raise HTTPException(
                status.HTTP_429_TOO_MANY_REQUESTS,
                detail=f"you have {self.open[holder]} streams open with your API token (at "
                f"most {self.limit}): close one, or share the video's stream_url instead",
                headers={"Retry-After": "5"},
            )

    def take(self, holder: int | None) -> None:
        """One more stream of `holder`'s open (None: a stream that counts for no one)."""
        if holder is not None:
            self.open[holder] += 1

    def give(self, holder: int | None) -> None:
        """One of `holder`'s streams ended."""
        if holder is not None:
            self.open[holder] -= 1
            if self.open[holder] <= 0:
                del self.open[holder]
