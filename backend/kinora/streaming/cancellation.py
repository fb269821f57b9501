"""Cancellation: what redis-py's asyncio client can lose, and one result awaited by
many, each of whom may go away.

A task cancelled while redis-py sends a command can have the CancelledError
swallowed inside the client (seen with UNSUBSCRIBE and SET while the hub stopped):
the task carries on as if nothing happened and whoever awaits it waits forever.
Long-running loops call `raise_if_cancelled()` at the top of each turn.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

T = TypeVar("T")


def raise_if_cancelled() -> None:
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class Shared(Generic[T]):
    """A future's result for every caller of `wait`: a caller cancelled while it waits
    cancels neither the future nor the others' wait. (What `asyncio.shield` gives each
    caller, for less: shield makes two callbacks and a future per caller, and three
    turns of the loop when the result comes; this, a future per caller and one turn.
    A reconnect storm's streams share their reads by the thousand.)"""

    __slots__ = ("future", "waiters")

    def __init__(self, future: asyncio.Future[T]) -> None:
        self.future = future
        self.waiters: list[asyncio.Future[T]] = []
        future.add_done_callback(self._landed)

    async def wait(self) -> T:
        future = self.future
        if future.done():
            return future.result()
        waiter: asyncio.Future[T] = future.get_loop().create_future()
        self.waiters.append(waiter)
        return await waiter

    def _landed(self, future: asyncio.Future[T]) -> None:
        waiters, self.waiters = self.waiters, []
        # (read here: a failure whose callers all went away is not "never retrieved")
        error = None if future.cancelled() else future.exception()
        for waiter in waiters:
            if waiter.done():  # its caller went away
                continue
            if future.cancelled():
                waiter.cancel()
            elif error is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(future.result())
