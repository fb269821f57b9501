"""`Shared`: one result for many waiters, each of whom may go away."""

from __future__ import annotations

import asyncio
import gc

import pytest

from kinora.streaming.cancellation import Shared


def test_every_waiter_gets_the_result_and_one_that_goes_away_cancels_nothing() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        shared = Shared(future)
        waiters = [asyncio.create_task(shared.wait()) for _ in range(3)]
        await asyncio.sleep(0)
        waiters[0].cancel()
        await asyncio.sleep(0)
        assert not future.cancelled()
        future.set_result(7)
        assert await waiters[1] == 7
        assert await waiters[2] == 7
        assert waiters[0].cancelled()
        assert await shared.wait() == 7  # after it landed: at once

    asyncio.run(main())


def test_a_failure_reaches_every_waiter_and_none_left_is_not_a_lost_error() -> None:
    reported: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: reported.append(context["message"]))
        failing: asyncio.Future[int] = loop.create_future()
        shared = Shared(failing)
        waiters = [asyncio.create_task(shared.wait()) for _ in range(2)]
        await asyncio.sleep(0)
        failing.set_exception(ConnectionError("gone"))
        for waiter in waiters:
            with pytest.raises(ConnectionError):
                await waiter

        # Everyone went away before it failed: nobody reads the error, and asyncio
        # does not report it as never retrieved.
        lonely: asyncio.Future[int] = loop.create_future()
        alone = Shared(lonely)
        waiter = asyncio.create_task(alone.wait())
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.sleep(0)
        lonely.set_exception(ConnectionError("gone too"))
        await asyncio.sleep(0)
        # (the cancelled waiter's traceback holds a frame that holds the future)
        del lonely, alone, waiter
        gc.collect()

    asyncio.run(main())
    assert reported == []


def test_a_cancelled_read_cancels_its_waiters() -> None:
    async def main() -> None:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        shared = Shared(future)
        waiter = asyncio.create_task(shared.wait())
        await asyncio.sleep(0)
        future.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter

    asyncio.run(main())
