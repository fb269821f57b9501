"""One object per running event loop, made on first use: the hub's pacer and the SSE
patrol are per loop (a process may run several: the tests, a thread's own loop), and
go away with their loop."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class PerLoop(Generic[T]):
    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = (
            weakref.WeakKeyDictionary()
        )

    def get(self) -> T:
        """The running loop's, made now if it has none."""
        loop = asyncio.get_running_loop()
        found = self._by_loop.get(loop)
        if found is None:
            found = self._by_loop[loop] = self._factory()
        return found

    def peek(self) -> T | None:
        """The running loop's, if it has one."""
        return self._by_loop.get(asyncio.get_running_loop())
