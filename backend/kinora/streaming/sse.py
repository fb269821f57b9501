"""The SSE response: sse-starlette's EventSourceResponse, with a client that stopped
reading cut off cheaply.

sse-starlette can time out every send (`send_timeout`), but that costs a cancel scope
and a timer per send, that is per event per watcher: a fifth of the API's CPU under
fan-out (bench.fanout). Here the ASGI `send` is wrapped instead (the public interface
of any ASGI response): each send notes when it began, and one watchdog per response,
waking every `stall_seconds / 4`, ends the response once a send has been stuck for
`stall_seconds`. The client, if it is still there, reconnects with Last-Event-ID and
loses nothing. (uvicorn logs each such response as "returned without completing
response": it could not be finished, and the server closes its connection.)
"""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
from sse_starlette import EventSourceResponse
from starlette.types import Message, Receive, Scope, Send

log = logging.getLogger(__name__)


class EventStream(EventSourceResponse):
    def __init__(
        self, content: Any, status_code: int = 200, *, stall_seconds: float, **kwargs: Any
    ) -> None:
        # status_code named: FastAPI reads its default off this signature for /docs.
        super().__init__(content, status_code, **kwargs)
        self.stall_seconds = stall_seconds
        self.stalled = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sending_since = 0.0  # 0: no send in progress

        async def watched(message: Message) -> None:
            nonlocal sending_since
            sending_since = time.monotonic()
            await send(message)
            sending_since = 0.0

        async with anyio.create_task_group() as group:

            async def watchdog() -> None:
                while True:
                    await anyio.sleep(self.stall_seconds / 4)
                    began = sending_since
                    if began and time.monotonic() - began >= self.stall_seconds:
                        self.stalled = True
                        log.info("an SSE client stopped reading: disconnected")
                        # Cancels the response (its generator's cleanup runs) and
                        # returns with the body unfinished, so the server closes the
                        # connection: a body that cannot be written cannot be ended.
                        group.cancel_scope.cancel()
                        return

            group.start_soon(watchdog)
            await super().__call__(scope, receive, watched)
            group.cancel_scope.cancel()
