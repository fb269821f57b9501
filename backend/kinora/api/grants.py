"""Revocation of open streams (README, Faults, "Tokens end"): the streams of this API
process, by user, each with the instant its token was issued (a scoped token's
signing, an API token's stream opening). A patrol reads, every few seconds, when each
of those users last rotated their API token, and ends (api: streaming.access) the
streams opened with what that rotation revoked. One query per patrol, and only while
streams are open. Expiry needs no patrol: each stream's access ends at its time."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select

from kinora.core.db import session_scope
from kinora.core.models import User, revoked_before_ms
from kinora.streaming.access import Access

log = logging.getLogger(__name__)

PATROL_SECONDS = 2.0
BATCH = 500  # user ids per query


class Grants:
    def __init__(self, patrol_seconds: float = PATROL_SECONDS) -> None:
        self.patrol_seconds = patrol_seconds
        self._open: defaultdict[int, dict[Access, int]] = defaultdict(dict)

    def add(self, user_id: int, issued_ms: int, access: Access) -> None:
        """A stream runs: ended if `user_id` rotates their token after `issued_ms`."""
        self._open[user_id][access] = issued_ms

    def remove(self, user_id: int, access: Access) -> None:
        """The stream `add`ed with `access` ended."""
        streams = self._open.get(user_id)
        if streams is not None:
            streams.pop(access, None)
            if not streams:
                del self._open[user_id]

    async def patrol(self) -> None:
        while True:
            await asyncio.sleep(self.patrol_seconds)
            if not self._open:
                continue
            try:
                revoked = await run_in_threadpool(revocations, list(self._open))
            except Exception:  # the database is away: try again next time
                log.exception("could not read token revocations")
                continue
            self.revoke(revoked)

    def revoke(self, revoked: dict[int, int]) -> int:
        """End the streams issued before their user's revocation; how many ended."""
        ended = 0
        for user_id, before_ms in revoked.items():
            for access, issued_ms in list(self._open.get(user_id, {}).items()):
                if issued_ms < before_ms and access.ended is None:
                    access.end("revoked")
                    ended += 1
        if ended:
            log.info("%d streams ended: their API token was rotated", ended)
        return ended


def revocations(user_ids: list[int]) -> dict[int, int]:
    """When each of these users last rotated their token (ms since the epoch), for those
    who ever did."""
    found: dict[int, int] = {}
    with session_scope() as session:
        for start in range(0, len(user_ids), BATCH):
            rows = session.execute(
                select(User.id, User.tokens_valid_after).where(
                    User.id.in_(user_ids[start : start + BATCH]),
                    User.tokens_valid_after.is_not(None),
                )
            )
            for user_id, after in rows:
                found[user_id] = revoked_before_ms(after)
    return found
