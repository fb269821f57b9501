"""The progress core: one configured live-progress layer, built by its host and
passed down (docs/library.md, "The core").

A ProgressCore owns what every stream of a process shares: its settings, its metrics
registry, its Redis connections (one hub: one subscriber and one command connection),
the pacer and the patrol, and the shutdown signal. The routes of every host are built
from its three route bodies (`sse`, `websocket`, `snapshot`) and a JobSource that says
who may watch what: Kinora's video routes (kinora.api.stream) and `progress_router`
alike, so each promise is kept once, for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from types import FrameType
from typing import Any

import redis
from fastapi import FastAPI, HTTPException, Request, Response, WebSocket, status
from prometheus_client import CollectorRegistry

from kinora.streaming import cursor, ended, many
from kinora.streaming.hub import StreamHub
from kinora.streaming.keys import StreamKey
from kinora.streaming.metrics import StreamMetrics
from kinora.streaming.settings import StreamSettings
from kinora.streaming.source import Grant, JobSource, Store, Watch, lost_notice
from kinora.streaming.sse import Patrol, event_response, frames, parse_last_event_id
from kinora.streaming.watcher import Pacer
from kinora.streaming.ws import CLOSE_BAD_TOKEN, CLOSE_NOT_FOUND, CLOSE_TRY_LATER, state_of, watch

log = logging.getLogger(__name__)

# What a client is told to wait before trying again while Redis is unreachable.
RETRY_AFTER_SECONDS = 2
# Events a snapshot carries: enough to draw a job's state without the stream.
RECENT_EVENTS = 50
# After the drain's time, how long streams still writing their goodbye may take before
# the server is told to shut down.
HANDOFF_MARGIN_SECONDS = 0.5
# Jobs one many-jobs stream may list (docs/protocol.md §6).
MAX_JOBS = 50


def too_many(name: str) -> HTTPException:
    return HTTPException(
        status.HTTP_422_UNPROCESSABLE_CONTENT,
        detail=f"at most {MAX_JOBS} `{name}` on one stream: open a second stream for the rest",
    )


def unavailable() -> HTTPException:
    """Redis down, paused or restarting: a 503 the client can act on, never a hang."""
    return HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE,
        detail=f"the event store (Redis) is unreachable: try again in {RETRY_AFTER_SECONDS} s",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


class ProgressCore:
    """`settings`: given, or read from the environment at `start` (StreamSettings.from_env,
    with `redis_url` if given). `registry`: where its metrics are counted (prometheus's
    default unless told). Start it in the host's lifespan (`running`)."""

    def __init__(
        self,
        settings: StreamSettings | None = None,
        *,
        redis_url: str | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._given = settings
        self._redis_url = redis_url
        self._registry = registry
        self._settings: StreamSettings | None = settings
        self._hub: StreamHub | None = None
        self._patrol: Patrol | None = None
        self.draining = False  # shutting down: /readyz says so, streams say goodbye
        self._previous: dict[int, Any] = {}  # the server's signal handlers, ours in front
        self._handoff: asyncio.Task[None] | None = None

    @property
    def settings(self) -> StreamSettings:
        if self._settings is None:
            raise RuntimeError("the progress core is not started: start it in the app's lifespan")
        return self._settings

    @property
    def hub(self) -> StreamHub:
        if self._hub is None:
            raise RuntimeError("the progress core is not started: start it in the app's lifespan")
        return self._hub

    @property
    def patrol(self) -> Patrol:
        assert self._patrol is not None, "started"
        return self._patrol

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Build and start what lives on the event loop (asyncio objects bind to the
        loop that runs them: never at import, never in another loop)."""
        settings = self._settings = self._given or StreamSettings.from_env(self._redis_url)
        self.metrics = StreamMetrics.of(self._registry)
        pacer = Pacer()
        self._hub = StreamHub(
            settings.redis_url,
            queue_size=settings.stream_queue_size,
            presence_ttl=settings.presence_ttl_seconds,
            history_page=settings.history_page_size,
            metrics=self.metrics,
            pacer=pacer,
            recheck_idle=settings.recheck_idle_seconds,
            on_quiet=self._recheck,
        )
        self._patrol = Patrol(pacer, on_shutdown=self.drain)
        self.draining = False
        await self._hub.start()
        self._own_signals()

    async def stop(self) -> None:
        if self._hub is None:
            return
        self._release_signals()
        if self._handoff is not None:
            self._handoff.cancel()
        await self.patrol.stop()
        await self._hub.stop()
        self._hub = None
        self._patrol = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[ProgressCore]:
        await self.start()
        try:
            yield self
        finally:
            await self.stop()

    def drain(self, spread: float = 0.0) -> int:
        """The process is shutting down: `/readyz` answers 503 from now on, and every
        stream ends with a last `retry:` (WebSockets close with 1012), each at a random
        moment within `spread` seconds so their clients come back to the other
        processes spread out; a stream opened meanwhile gets its history and the same
        goodbye. Returns how many streams were told."""
        if self.draining:
            return 0
        self.draining = True
        self.patrol.shutting_down(spread)
        return self.hub.drain("shutdown", spread=spread)

    async def _recheck(self, key: StreamKey, store: Store) -> None:
        """A job its streams have heard nothing of for a while: when its store says it
        ended, its end is found (published, if Redis never got it: its worker died with
        its last events) and its watchers read its history again, up to that end."""
        record = await store.load(key)
        if record is None or not record.ended:
            return
        grant = Grant(key, record=record, store=store)
        if await ended.find_end(self.hub, grant, self.settings.retention) is not None:
            log.info("%s ended unheard: its streams read its end from history", key)
            self.hub.resync(key)

    # -- the shutdown signal --------------------------------------------------------------

    def _own_signals(self) -> None:
        """Stand in front of the server's SIGTERM and SIGINT handlers (uvicorn's, in each
        of `--workers N` processes: a dependency's patch of the server class does not
        reach the handler a worker process installed before it imported the app)."""
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only (an app served from a thread)
        loop = asyncio.get_running_loop()

        def handler(signum: int, frame: FrameType | None) -> None:
            loop.call_soon_threadsafe(self._signalled, signum, frame)

        for signum in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(signum)
            if callable(previous):  # a server that catches it (not the default action)
                self._previous[signum] = previous
                signal.signal(signum, handler)

    def _release_signals(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, previous in self._previous.items():
                signal.signal(signum, previous)
        self._previous.clear()

    def _signalled(self, signum: int, frame: FrameType | None) -> None:
        """SIGTERM: drain over `drain_seconds`, then the server shuts down (requests in
        flight finish). SIGINT (Ctrl-C), a second signal, or no drain time: at once."""
        previous: Callable[[int, FrameType | None], Any] = self._previous[signum]
        spread = self.settings.drain_seconds
        if signum != signal.SIGTERM or self._handoff is not None or spread <= 0 or not self._hub:
            if self._hub is not None:
                self.drain()
            previous(signum, frame)
            return
        told = self.drain(spread)
        log.info("SIGTERM: draining %d streams over %g s, then shutting down", told, spread)
        self._handoff = asyncio.get_running_loop().create_task(
            self._hand_off(previous, signum, frame, spread), name="drain"
        )

    def _open(self) -> bool:
        return bool(self.patrol.streams or self.hub.watching)

    async def _hand_off(
        self,
        previous: Callable[[int, FrameType | None], Any],
        signum: int,
        frame: FrameType | None,
        spread: float,
    ) -> None:
        """The server's own handler once every stream has said goodbye (or the drain's
        time is up): it stops accepting, lets requests in flight finish, and exits."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + spread + HANDOFF_MARGIN_SECONDS
        while loop.time() < deadline and self._open():  # noqa: ASYNC110 (two counts, no event)
            await asyncio.sleep(0.1)
        previous(signum, frame)

    # -- the route bodies ---------------------------------------------------------------

    async def sse(
        self, request: Request, source: JobSource, job_id: str, last_event_id: str | None = None
    ) -> Response:
        """Server-Sent Events of one job (docs/protocol.md §2): its events after
        `Last-Event-ID` (header, else `last_event_id`), then the live ones, ending after
        `complete`; `204` when the client has the job's end."""
        after = parse_last_event_id(request.headers.get("last-event-id", last_event_id))
        grant = await source.grant(request, job_id)
        hub = self.hub
        if not await hub.reachable():
            raise unavailable()
        settings = self.settings
        try:
            record = grant.record
            if record is not None and record.ended:
                end = await ended.find_end(hub, grant, settings.retention)
                if end is not None and after >= end:
                    return Response(status_code=status.HTTP_204_NO_CONTENT)  # EventSource stops
                if end is not None:
                    lost = lost_notice(grant.key, grant.store)
                    body = ended.frames(hub, grant, after, end, settings.sse_retry_ms, lost)
                    return self._response(body, grant)
            elif after > 0:
                # Redis knows where the job ends when the store does not (no store, or
                # its record read a moment before the end: a reconnect storm's shared
                # read): a client that has the end is told so.
                end = await hub.end_seq(grant.key)
                if end is not None and after >= end:
                    return Response(status_code=status.HTTP_204_NO_CONTENT)
        except redis.RedisError as exc:
            log.warning("stream of %s refused: Redis unreachable (%s)", grant.key, exc)
            raise unavailable() from exc
        body = frames(
            hub, grant.key, after, settings.sse_retry_ms, settings.sse_timeout_seconds,
            floor=grant.floor, lost=lost_notice(grant.key, grant.store), access=grant.access,
            finish=grant.finish, store=grant.store,
        )  # fmt: skip
        return self._response(body, grant)

    async def many_sse(
        self,
        request: Request,
        source: JobSource,
        job_ids: list[str],
        last_event_id: str | None = None,
    ) -> Response:
        """One SSE response for several jobs (docs/protocol.md §6): every event of each,
        in its own `seq` order, each `id:` a cursor of the whole stream; `204` when the
        cursor has every listed job's end. The source decides which jobs, and whether
        the caller's new ones join (no job listed)."""
        resume = cursor.parse(request.headers.get("last-event-id", last_event_id))
        listed = list(dict.fromkeys(job_ids))
        hub = self.hub
        if not await hub.reachable():
            raise unavailable()

        async def since(key: StreamKey) -> int:
            value = await hub.redis.get(key.seq)
            return int(value or 0)

        try:
            watch = await source.watch_many(request, listed, resume, since)
            if watch.follow is None and await self._seen_all(watch, resume):
                return Response(status_code=status.HTTP_204_NO_CONTENT)
        except redis.RedisError as exc:
            log.warning("a many-jobs stream refused: Redis unreachable (%s)", exc)
            raise unavailable() from exc
        return event_response(
            many.frames(hub, watch, resume, self.settings),
            self.settings,
            patrol=self.patrol,
            headers=watch.headers,
            lease=watch.lease,
        )

    async def _seen_all(self, watch: Watch, resume: dict[str, int]) -> bool:
        """Whether the client has the end of every job of the stream."""
        for grant in watch.grants:
            record = grant.record
            if record is None or not record.ended:
                if record is not None:
                    return False
                end = await self.hub.end_seq(grant.key)  # Redis alone knows the end
            else:
                end = await ended.find_end(self.hub, grant, self.settings.retention)
            if end is None or resume.get(cursor.token(grant.key.id), 0) < end:
                return False
        return True

    def _response(self, body: AsyncIterator[bytes], grant: Grant) -> Response:
        return event_response(
            body, self.settings, patrol=self.patrol, headers=grant.headers, lease=grant.lease
        )

    async def websocket(self, websocket: WebSocket, source: JobSource, job_id: str) -> None:
        """The WebSocket of one job (docs/protocol.md §3)."""
        # Accept first: a close before accepting is an HTTP 403 and loses the code.
        await websocket.accept()
        try:
            grant = await source.grant(websocket, job_id)
        except HTTPException as exc:
            code = {
                status.HTTP_401_UNAUTHORIZED: CLOSE_BAD_TOKEN,
                status.HTTP_429_TOO_MANY_REQUESTS: CLOSE_TRY_LATER,
            }.get(exc.status_code, CLOSE_NOT_FOUND)
            await websocket.close(code, reason=str(exc.detail)[:120])
            return
        record = grant.record
        with grant.lease or contextlib.nullcontext():
            await watch(
                websocket,
                self.hub,
                grant.key,
                self.settings,
                hello=grant.hello or {grant.key.id_field: grant.key.id},
                status=record.status if record else None,
                progress=record.progress if record else None,
                access=grant.access,
                finish=grant.finish,
                store=grant.store,
            )

    async def snapshot(self, connection: Request, source: JobSource, job_id: str) -> dict[str, Any]:
        """A job's status, progress and recent events: the polling fallback."""
        grant = await source.grant(connection, job_id)
        if not await self.hub.reachable():
            raise unavailable()
        try:
            recent = await self.hub.recent(grant.key, RECENT_EVENTS)
        except redis.RedisError as exc:
            raise unavailable() from exc
        events = [item.event for item in recent]
        told_status, told_progress = state_of(events)
        record = grant.record
        return {
            grant.key.id_field: grant.key.id,
            "status": record.status if record else told_status,
            "progress": max(record.progress, told_progress) if record else told_progress,
            "last_event_id": str(recent[-1].seq) if recent else None,
            "logs": events,
        }


@contextlib.asynccontextmanager
async def core_of(app: FastAPI, core: ProgressCore | None = None) -> AsyncIterator[ProgressCore]:
    """The app's one core (`app.state.progress`), started with the app and stopped with
    it: the first to ask starts `core` (or one from the environment); later ones (a
    second router, Kinora's own routes) share it: one hub, one Redis subscriber."""
    existing: ProgressCore | None = getattr(app.state, "progress", None)
    if existing is not None:
        yield existing
        return
    core = core or ProgressCore()
    async with core.running():
        app.state.progress = core
        try:
            yield core
        finally:
            del app.state.progress
