"""How many streams (SSE and WebSocket) one user may hold open at once in one API
process: a client in a reconnect loop, or a script that opens streams and never reads,
cannot take a process's memory from everyone else (CONTRACT §8)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import HTTPException, status


class StreamQuota:
    def __init__(self, limit: int) -> None:
        self.limit = limit  # 0: no limit
        self.open: Counter[int] = Counter()

    def check(self, user_id: int) -> None:
        """429 when the user holds `limit` streams already."""
        if self.limit and self.open[user_id] >= self.limit:
            raise HTTPException(
                status.HTTP_429_TOO_MANY_REQUESTS,
                detail=f"you have {self.open[user_id]} streams open (at most {self.limit}): "
                "close one, or watch several videos through one page",
                headers={"Retry-After": "5"},
            )

    @contextmanager
    def held(self, user_id: int) -> Iterator[None]:
        self.open[user_id] += 1
        try:
            yield
        finally:
            self.open[user_id] -= 1
            if self.open[user_id] <= 0:
                del self.open[user_id]
