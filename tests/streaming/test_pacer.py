"""The hub wakes a video's sleeping watchers a slice per turn of the event loop, so
the loop reads its sockets (Redis among them) between slices: an event that arrives
while thousands of watchers are being written to reaches the ones not yet written to
in the same pass. A watcher that has just written waits behind the ones not yet
woken: every watcher writes once a pass."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from kinora.streaming.frames import Item
from kinora.streaming.watcher import WAKE_SLICE, Pacer, Topic

LOOPS = {"asyncio": asyncio.run, "uvloop": uvloop.run}


def event(seq: int) -> Item:
    return Item(b'{"seq":%d,"type":"log"}' % seq, seq, "log")


@pytest.mark.parametrize("loop_name", LOOPS)
def test_an_event_that_arrives_mid_pass_reaches_the_watchers_not_yet_woken(
    loop_name: str,
) -> None:
    run: Callable[[Coroutine[Any, Any, None]], None] = LOOPS[loop_name]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        topic = Topic(Pacer())
        seen: list[tuple[int, int]] = []  # (watcher, events it would write), in order
        ours, theirs = socket.socketpair()

        async def watcher(number: int) -> None:
            written = 0
            while written < 2:  # asleep until there is something new, as a Watcher
                woken: asyncio.Future[None] = loop.create_future()
                topic.waiting.append(woken)
                await woken
                written = topic.end
                seen.append((number, written))
                if len(seen) == 1:
                    theirs.send(b"2")  # while the first slice writes, event 2 arrives

        def from_redis() -> None:
            ours.recv(1)
            topic.append(event(2), keep=64)

        with ours, theirs:
            ours.setblocking(False)
            loop.add_reader(ours, from_redis)
            watchers = [asyncio.create_task(watcher(n)) for n in range(3 * WAKE_SLICE)]
            await asyncio.sleep(0)  # all asleep
            topic.append(event(1), keep=64)
            await asyncio.wait_for(asyncio.gather(*watchers), 10)
            loop.remove_reader(ours)

        first_pass = seen[: 3 * WAKE_SLICE]
        assert [n for n, _ in first_pass] == list(range(3 * WAKE_SLICE))  # once each, in order
        ends = [end for _, end in first_pass]
        assert set(ends[:WAKE_SLICE]) == {1}
        # The same pass: asyncio runs a socket's callbacks after what was already due
        # (one slice), uvloop (the server's loop) before it.
        assert set(ends[(1 if loop_name == "uvloop" else 2) * WAKE_SLICE :]) == {2}
        # The next pass: the first slice, which had not seen event 2, comes first.
        assert [n for n, _ in seen[3 * WAKE_SLICE : 4 * WAKE_SLICE]] == list(range(WAKE_SLICE))

    run(main())


def test_a_watcher_that_went_away_is_skipped() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        topic = Topic(Pacer())
        gone, waiting = loop.create_future(), loop.create_future()
        gone.cancel()  # its stream was cancelled while it slept
        topic.waiting.extend([gone, waiting])
        topic.append(event(1), keep=64)
        assert waiting.done()
        assert gone.cancelled()

    asyncio.run(main())


def test_a_turn_is_taken_behind_every_watcher_in_line() -> None:
    """A finished stream's teardown waits until the watchers already in line have
    been woken (and so written to); with nobody in line it goes at once."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        pacer = Pacer()
        await asyncio.wait_for(pacer.wait_turn(), 1)  # nobody in line

        line = [loop.create_future() for _ in range(2 * WAKE_SLICE)]
        pacer.release(line)  # the first slice is woken at once, the second is in line
        teardown = asyncio.create_task(pacer.wait_turn())
        woken_when_it_ran: list[int] = []
        teardown.add_done_callback(lambda _: woken_when_it_ran.append(sum(f.done() for f in line)))
        await asyncio.wait_for(teardown, 1)
        assert woken_when_it_ran == [2 * WAKE_SLICE]

    asyncio.run(main())
