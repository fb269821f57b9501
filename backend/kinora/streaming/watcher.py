"""One video's live events in a process (Topic), and one client's view of them
(Watcher): history replayed in pages after its last seen `seq`, then the live events,
merged by `seq` and taken in batches (one write per wake-up)."""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Literal, Protocol

from kinora.streaming.events import history_lost
from kinora.streaming.frames import RESYNC, Item
from kinora.streaming.keys import StreamKey
from kinora.streaming.metrics import StreamMetrics

log = logging.getLogger(__name__)

# Why a stream was ended from outside: the process is shutting down, Redis stopped
# answering (the client comes back), or its token expired or was revoked (it does not).
Drain = Literal["shutdown", "redis", "expired", "revoked"]


class Source(Protocol):
    """What a watcher needs of its hub (kinora.streaming.hub.StreamHub): the history,
    the counts it keeps, and letting a watcher go."""

    history_page: int
    slow_cuts: int
    metrics: StreamMetrics
    delivered: dict[str, int]
    deadlines: Deadlines

    async def history(self, key: StreamKey, after: int, limit: int | None = None) -> list[Item]: ...

    async def history_state(self, key: StreamKey, after: int) -> tuple[list[Item], int | None]: ...

    def detach(self, watcher: Watcher) -> None: ...


# Watchers woken per turn of the event loop (see Pacer).
WAKE_SLICE = 128


class Wakeable(Protocol):
    """What waits in a topic for its next event: a sleeping watcher's future, or a
    many-jobs stream's hook (kinora.streaming.many)."""

    def done(self) -> bool: ...

    def set_result(self, result: None, /) -> None: ...


class Pacer:
    """Wakes sleeping watchers, at most WAKE_SLICE per turn of the event loop, in the
    order they went to sleep, so the loop reads its sockets (the Redis subscriber among
    them) between slices: an event that arrives while thousands of watchers are being
    written to reaches the ones not yet written to in the same pass, instead of waiting
    for the whole pass to end (which doubled the worst latency of a hot video). A
    watcher that has just written goes to the back of the line: every watcher writes
    once per pass, with everything that arrived since its last write. One per progress
    core, shared by its hub and its streams."""

    __slots__ = ("handle", "queue")

    def __init__(self) -> None:
        self.queue: deque[Wakeable] = deque()
        self.handle: asyncio.Handle | None = None

    async def wait_turn(self) -> None:
        """Wait behind every watcher already in line, for work that can wait until they
        have written (a finished stream's teardown)."""
        if self.queue:
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.queue.append(turn)
            await turn

    def release(self, waiting: Sequence[Wakeable]) -> None:
        self.queue.extend(waiting)
        if self.handle is None:
            self._turn()

    def _turn(self) -> None:
        self.handle = None
        queue = self.queue
        for _ in range(min(WAKE_SLICE, len(queue))):
            future = queue.popleft()
            if not future.done():
                future.set_result(None)
        if queue:
            self.handle = asyncio.get_running_loop().call_soon(self._turn)


class Deadlines:
    """Callbacks due at a loop time, with one timer per tenth of a second that has any
    due, not one per caller: every open stream has two deadlines (its lifetime and its
    token's expiry), and a timer each, made at every open, was two of the objects
    that an idle connection holds (1.1 KB of its 22, by tracemalloc) and the garbage
    collector walks. One per hub."""

    GRAIN = 0.1  # seconds: a callback runs at most this late

    __slots__ = ("_due", "_timers")

    def __init__(self) -> None:
        self._due: dict[int, dict[object, Callable[[], object]]] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}

    def add(self, owner: object, when: float, callback: Callable[[], object]) -> int:
        """Run `callback` at `when` (loop time) unless `owner` is removed before; returns
        the slot to remove it from."""
        slot = math.ceil(when / self.GRAIN)
        due = self._due.get(slot)
        if due is None:
            due = self._due[slot] = {}
            loop = asyncio.get_running_loop()
            self._timers[slot] = loop.call_at(slot * self.GRAIN, self._fire, slot)
        due[owner] = callback
        return slot

    def remove(self, owner: object, slot: int) -> None:
        due = self._due.get(slot)
        if due is not None and due.pop(owner, None) is not None and not due:
            del self._due[slot]
            self._timers.pop(slot).cancel()

    def _fire(self, slot: int) -> None:
        self._timers.pop(slot, None)
        for callback in self._due.pop(slot, {}).values():
            callback()


class Topic:
    """One video's live events in this process, shared by all its watchers.

    `log` keeps the most recent events (at most twice the hub's queue size); each
    watcher only holds a cursor into it, so an event costs one append however many
    watch it, and memory is bounded per video, not per watcher.
    """

    __slots__ = (
        "_ready_timer",
        "_ready_waiters",
        "base",
        "heard",
        "log",
        "pacer",
        "ready",
        "store",
        "waiting",
        "watchers",
    )

    def __init__(self, pacer: Pacer | None = None) -> None:
        self.pacer = pacer or Pacer()
        # Where its job's record is kept (a watcher's, when it has one), and `end` when
        # the hub last looked: unchanged a whole round later, the topic is quiet and the
        # hub asks the store whether its job ended (StreamHub._recheck_quiet).
        self.store: object | None = None
        self.heard = -1
        self.watchers: set[Watcher] = set()
        self.ready = asyncio.Event()  # subscribed: set by the hub (mark_ready)
        self._ready_waiters: list[asyncio.Future[bool]] = []
        self._ready_timer: asyncio.TimerHandle | None = None
        self.log: list[Item] = []
        self.base = 0  # the position of log[0] among every event this topic received
        self.waiting: list[Wakeable] = []  # watchers asleep until the next event

    def until_ready(self, timeout: float) -> asyncio.Future[bool]:
        """True once the subscription is confirmed; False if it is not within `timeout`
        of the first watcher that is still waiting having asked. One timer for all of
        them, not one each: a reconnect storm brings thousands of watchers in the
        moment before the subscription's confirmation is read, and a timer each (made
        and cancelled) was a sixth of the API's CPU in it (bench.storm, py-spy)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._ready_waiters.append(future)
        if self._ready_timer is None:
            self._ready_timer = loop.call_later(timeout, self._settle_waiters, False)
        return future

    def mark_ready(self) -> None:
        self.ready.set()
        self._settle_waiters(True)

    def _settle_waiters(self, ready: bool) -> None:
        if self._ready_timer is not None:
            self._ready_timer.cancel()
            self._ready_timer = None
        waiters, self._ready_waiters = self._ready_waiters, []
        for future in waiters:
            if not future.done():  # not cancelled with its watcher
                future.set_result(ready)

    @property
    def end(self) -> int:
        return self.base + len(self.log)

    def append(self, item: Item, keep: int) -> list[Watcher]:
        """Add an event and wake the waiting watchers; returns the watchers that fell
        more than `keep` events behind (they are cut off)."""
        self.log.append(item)
        self.wake()
        if len(self.log) <= 2 * keep:
            return []
        drop = len(self.log) - keep
        self.log = self.log[drop:]  # a new list: a reader's slice of the old one stays valid
        self.base += drop
        return [w for w in self.watchers if w.cursor < self.base]

    def wake(self) -> None:
        if self.waiting:
            waiting, self.waiting = self.waiting, []
            self.pacer.release(waiting)


# History is read in pages of this many events, each written before the next is read:
# the transport's flow control then bounds a replaying connection's memory, whatever the
# history's length (README, Faults).
HISTORY_PAGE = 200

# Builds the `history_lost` notice for (after, resume): the caller (the API) adds the
# video's state from its database; the hub alone knows only the seqs.
LostNotice = Callable[[int, int], Awaitable[bytes]]


def resume_point(after: int, history: list[Item], counter: int | None, floor: int) -> int | None:
    """Where a stream resumes when events after `after` can no longer be replayed, or
    None when nothing is missing. `counter` is Redis's seq counter (None: gone), `floor`
    the highest seq the database knows was used."""
    if history:
        first = history[0].seq
        return first - 1 if first > after + 1 else None
    known = max(counter or 0, floor)
    if known > after:
        return known  # events after `after` were used, and none is left
    if counter is None and after > 0:
        return after  # Redis lost the video's events: say so, with the state
    return None


class Watcher:
    """One client's registration for one video: a cursor into its topic's log."""

    def __init__(
        self,
        hub: Source,
        key: StreamKey,
        topic: Topic,
        after: int,
        transport: str = "sse",
        *,
        floor: int = 0,
        lost: LostNotice | None = None,
    ) -> None:
        self.hub = hub
        self.floor = floor
        self.lost = lost
        self.transport = transport
        self.key = key
        self.topic = topic
        self.cursor = topic.end  # the live events it has taken from the topic
        self.last_seq = after
        self.cut = False  # set when it fell too far behind: the client is too slow
        self.expired = False
        # Set when the hub ends every stream (the process shuts down, Redis stopped
        # answering): the client should reconnect.
        self.drained: Drain | None = None

    @property
    def backlog(self) -> int:
        """Live events received for it and not yet taken by its client."""
        return self.topic.end - self.cursor

    def cut_off(self) -> None:
        if self.cut:
            return
        self.cut = True
        self.hub.slow_cuts += 1
        self.hub.metrics.clients_cut.labels(self.transport).inc()
        self.hub.detach(self)
        self.topic.wake()
        log.info("watcher of %s cut off: %d events behind", self.key, self.backlog)

    def end(self, why: Drain) -> bool:
        """End the stream from outside, saying why; False if it was ended already."""
        if self.drained is not None:
            return False
        self.drained = why
        self.expired = True
        self.topic.wake()
        return True

    def _expire(self) -> None:
        self.expired = True
        self.topic.wake()

    async def notice(self, resume: int) -> Item:
        """The `history_lost` notice; the stream goes on after `resume`."""
        if self.lost is not None:
            raw = await self.lost(self.last_seq, resume)
        else:
            raw = history_lost(self.key, self.last_seq, resume)
        self.last_seq = max(self.last_seq, resume)
        return Item(raw, resume, "log")

    def _took(self, batch: list[Item]) -> list[Item]:
        self.last_seq = max(self.last_seq, batch[-1].seq)
        self.hub.delivered[self.transport] += len(batch)
        return batch

    async def replay(self, *, check_lost: bool = True) -> AsyncIterator[list[Item]]:
        """History after `last_seq`, a page at a time, told of a gap first if the events
        it asks for are gone."""
        history, counter = await self.hub.history_state(self.key, self.last_seq)
        if check_lost:
            resume = resume_point(self.last_seq, history, counter, self.floor)
            if resume is not None:
                yield self._took([await self.notice(resume)])
        elif history and history[0].seq > self.last_seq + 1:
            yield self._took([await self.notice(history[0].seq - 1)])
        while history:
            yield self._took(history)
            if len(history) < self.hub.history_page:
                return
            history = await self.hub.history(self.key, self.last_seq)

    async def batches(
        self, deadline: float | None = None, *, caught_up: bool = False
    ) -> AsyncIterator[list[Item]]:
        """History after `last_seq`, then live events, in seq order, none twice, in
        batches: everything that arrived since the client last took some. `caught_up`:
        an empty batch between the history and the live events.

        Ends when the client fell too far behind (it resumes with Last-Event-ID) or
        at `deadline` (loop time).
        """
        loop = asyncio.get_running_loop()
        deadlines = self.hub.deadlines
        slot = None if deadline is None else deadlines.add(self, deadline, self._expire)
        try:
            async for page in self.replay():
                yield page
            if caught_up:
                yield []
            topic = self.topic
            while not (self.cut or self.expired):
                if self.cursor == topic.end:
                    future: asyncio.Future[None] = loop.create_future()
                    topic.waiting.append(future)
                    await future
                    continue
                batch = self.take_now()
                if batch is None:  # a gap: filled from history
                    async for batch in self.take():
                        yield batch
                elif batch:
                    yield batch
        finally:
            if slot is not None:
                deadlines.remove(self, slot)

    def take_now(self) -> list[Item] | None:
        """`take` without waiting, when nothing is missing (almost always): the live
        events since it last took, in seq order; None when there is a gap to fill from
        history first (then `take`)."""
        topic = self.topic
        if self.cursor < topic.base:
            self.cut_off()
            return []
        last = self.last_seq
        batch: list[Item] = []
        for item in topic.log[self.cursor - topic.base :]:
            if item is RESYNC or item.seq > last + 1:
                return None
            if item.seq > last:
                last = item.seq
                batch.append(item)
        self.cursor = topic.end
        return self._took(batch) if batch else batch

    async def take(self) -> AsyncIterator[list[Item]]:
        """The live events that arrived since it last took (none: nothing did), in seq
        order, none twice; cut off if it fell too far behind."""
        topic = self.topic
        if self.cursor < topic.base:
            self.cut_off()
            return
        items = topic.log[self.cursor - topic.base :]
        self.cursor = topic.end
        batch: list[Item] = []
        for item in items:
            if item is RESYNC or item.seq > self.last_seq + 1:
                # A gap (the subscriber reconnected, events raced, or Redis lost data
                # and numbering jumped): fill it from history, or say that it cannot
                # be filled.
                if batch:
                    yield self._took(batch)
                    batch = []
                async for page in self.replay(check_lost=False):
                    yield page
            if item is not RESYNC and item.seq > self.last_seq:
                self.last_seq = item.seq
                batch.append(item)
        if batch:
            yield self._took(batch)

    async def events(self, deadline: float | None = None) -> AsyncIterator[Item]:
        """The same as `batches`, one event at a time."""
        async for batch in self.batches(deadline):
            for item in batch:
                yield item
