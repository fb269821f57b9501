"""SQLStore: a library job's floor and outcome in the host's SQL database
(docs/library.md, "A store"), so its streams keep the promises Kinora's videos keep
when Redis loses data: each ends with the job's outcome, `seq` never goes backwards,
and `history_lost` carries the job's state.

One table (`kinora_progress` unless named), created on first use unless told not to
(the docs show it for a migration). Both sides use it: the worker's `SSELogger(...,
store=store)` writes it (the floor every STORE_EVERY events and at each stage, the
outcome before its `complete` is published, the end after), and `progress_router(...,
store=store)` reads it when a stream opens. Needs SQLAlchemy (`pip install
'kinora[store]'`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

try:
    import sqlalchemy as sa
except ImportError as exc:  # pragma: no cover - the bare install
    raise ImportError(
        "kinora.streaming.SQLStore needs SQLAlchemy: pip install 'kinora[store]'"
    ) from exc

from anyio import to_thread

from kinora.streaming.keys import StreamKey
from kinora.streaming.source import OUTCOMES, JobRecord

log = logging.getLogger(__name__)

# The floor is written every this many events (and at each stage and at the end): a
# Redis that lost a job's counter numbers its next event SEQ_JUMP_AFTER_LOSS (100)
# above the floor, so a floor this far behind still never reuses a seq.
STORE_EVERY = 32


def table_of(metadata: sa.MetaData, name: str = "kinora_progress") -> sa.Table:
    """The store's table, for a host's own migration (Alembic's `op.create_table`)."""
    return sa.Table(
        name,
        metadata,
        sa.Column("kind", sa.String(64), primary_key=True),
        sa.Column("job_id", sa.String(255), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("progress", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_seq", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("end_seq", sa.BigInteger, nullable=True),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("result", sa.JSON, nullable=True),
        sa.Column("ended_at", sa.Float, nullable=True),
        sa.Column("updated_at", sa.Float, nullable=False),
    )


class SQLStore:
    """`database_url` (or an Engine of the host's): any database SQLAlchemy speaks."""

    def __init__(
        self, database_url: str | sa.Engine, *, table: str = "kinora_progress", create: bool = True
    ) -> None:
        self.engine = (
            sa.create_engine(database_url) if isinstance(database_url, str) else database_url
        )
        self.table = table_of(sa.MetaData(), table)
        self._create = create
        self._created = False
        self._lock = threading.Lock()

    def _ready(self) -> None:
        if self._create and not self._created:
            with self._lock:
                if not self._created:
                    self.table.create(self.engine, checkfirst=True)
                    self._created = True

    # -- the worker's side (synchronous: Celery's prefork workers) ----------------------

    def floor(self, key: StreamKey) -> int:
        """The highest seq recorded for the job (0: none)."""
        self._ready()
        t = self.table
        with self.engine.connect() as conn:
            found = conn.execute(sa.select(t.c.last_seq).where(*self._is(key))).scalar()
        return int(found or 0)

    def record(
        self,
        key: StreamKey,
        seq: int,
        *,
        status: str | None = None,
        progress: int | None = None,
        end: bool = False,
        reason: str | None = None,
        result: dict[str, Any] | None = None,
    ) -> None:
        """Raise the job's floor to `seq` (never lower it); set what is given. `end`:
        `seq` is its `complete`'s. A job's outcome is never changed once recorded."""
        self._ready()
        t = self.table
        now = time.time()
        floor: dict[str, Any] = {
            "last_seq": sa.case((t.c.last_seq < seq, seq), else_=t.c.last_seq),
            "updated_at": now,
        }
        if progress is not None:
            floor["progress"] = sa.case((t.c.progress < progress, progress), else_=t.c.progress)
        if end:
            floor["end_seq"] = seq
        state: dict[str, Any] = {}
        if status is not None:
            state["status"] = status
            if status in OUTCOMES:
                state.update(ended_at=now, reason=reason, result=result)
        with self.engine.begin() as conn:
            if self._update(conn, key, floor, state):
                return
        try:  # the job's first record
            with self.engine.begin() as conn:
                conn.execute(
                    sa.insert(t).values(
                        kind=key.kind,
                        job_id=str(key.id),
                        **{"status": "processing", **state},
                        progress=progress or 0,
                        last_seq=seq,
                        end_seq=seq if end else None,
                        updated_at=now,
                    )
                )
        except sa.exc.IntegrityError:  # another writer made it meanwhile
            with self.engine.begin() as conn:
                self._update(conn, key, floor, state)

    def _update(
        self, conn: sa.Connection, key: StreamKey, floor: dict[str, Any], state: dict[str, Any]
    ) -> bool:
        t = self.table
        if not conn.execute(sa.update(t).where(*self._is(key)).values(**floor)).rowcount:
            return False
        if state:
            live = t.c.status.not_in(sorted(OUTCOMES))  # an outcome is final
            conn.execute(sa.update(t).where(*self._is(key), live).values(**state))
        return True

    # -- the API's side (kinora.streaming.source.Store) ---------------------------------

    async def load(self, key: StreamKey) -> JobRecord | None:
        return await to_thread.run_sync(self._load, key)

    async def record_end(self, key: StreamKey, seq: int) -> None:
        await to_thread.run_sync(lambda: self.record(key, seq, end=True))

    def _load(self, key: StreamKey) -> JobRecord | None:
        self._ready()
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(self.table).where(*self._is(key))).mappings().first()
        if row is None:
            return None
        return JobRecord(
            status=row["status"],
            progress=row["progress"],
            last_seq=row["last_seq"],
            end_seq=row["end_seq"],
            reason=row["reason"],
            ended_at=row["ended_at"],
            result=row["result"] or {},
        )

    def _is(self, key: StreamKey) -> tuple[Any, Any]:
        return (self.table.c.kind == key.kind, self.table.c.job_id == str(key.id))
