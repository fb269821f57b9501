"""Cancellation that redis-py's asyncio client can lose.

A task cancelled while redis-py sends a command can have the CancelledError
swallowed inside the client (seen with UNSUBSCRIBE and SET while the hub stopped):
the task carries on as if nothing happened and whoever awaits it waits forever.
Long-running loops call `raise_if_cancelled()` at the top of each turn.
"""

from __future__ import annotations

import asyncio


def raise_if_cancelled() -> None:
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
