"""A video's SSE stream served as a bare ASGI app, in front of FastAPI.

A reconnect storm opens thousands of streams a second, and each one that goes through
FastAPI passes its middleware (each a coroutine that stays suspended as long as the
stream is open), walks its routes, solves the route's dependencies (the path and query
parameters' validation, the bearer scheme) and sets up its exception handling and exit
stacks: objects that each open stream allocates, holds, and that the garbage collector
walks. This answers the one route that storms hit, `GET|HEAD /api/v1/videos/{id}/stream`,
with the call the FastAPI route makes (ProgressCore.sse), the trace id the API's
middleware would give it, and the app's own error handlers: the same answers, the route
still in /docs. Everything else goes on to the app: other routes, an id FastAPI would
refuse or read differently (`007`, out of range), a body over the cap (the app's 413),
a cross-origin request when CORS is on (the app's CORS headers).
"""

from __future__ import annotations

import re
from typing import Any

from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from kinora.api.deps import MAX_ID
from kinora.api.middleware import TRACE_STATE, TraceMiddleware
from kinora.core import logs
from kinora.streaming.core import ProgressCore
from kinora.streaming.sse import SERVER_SEND, SHALLOW

# The path FastAPI matches as the stream route (api.stream), for the ids it accepts
# as written: no sign, no leading zero.
STREAM_PATH = re.compile(r"/api/v1/videos/([1-9][0-9]{0,18})/stream")
METHODS = ("GET", "HEAD")


class StreamFront:
    """`kinora api`'s app: the video stream route served here, every other request
    passed to `app`, the FastAPI app, with the server's `send` kept in its scope
    (kinora.streaming.sse.direct_writes)."""

    def __init__(self, app: Any, *, body_limit: int, cors: bool) -> None:
        self.app = app
        self.body_limit = body_limit
        self.cors = cors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            video_id = self.stream_of(scope)
            if video_id is not None:
                trace_id = TraceMiddleware.trace_id(scope)
                with logs.bind(trace_id=trace_id):
                    # (the response is awaited here: no frame of `respond`'s stays above
                    # every open stream)
                    response = await self.respond(video_id, trace_id, scope, receive)
                    await response(scope, receive, send)
                return
            # The server's own `send`, for the app's streams (as direct_writes keeps it:
            # one coroutine less above every request than wrapping this in it).
            scope[SERVER_SEND] = send
        await self.app(scope, receive, send)

    def stream_of(self, scope: Scope) -> str | None:
        """The video whose stream this request asks for, if it is one this serves."""
        if scope["method"] not in METHODS:
            return None
        match = STREAM_PATH.fullmatch(route_path(scope))
        if match is None or int(match[1]) > MAX_ID or not self.plain(scope):
            return None
        return match[1]

    def plain(self, scope: Scope) -> bool:
        """Nothing the app's middleware would answer or add to: no body over the cap,
        no `Origin` while CORS is on."""
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.body_limit:
                return False
            if name == b"origin" and self.cors:
                return False
        return True

    async def respond(self, video_id: str, trace_id: str, scope: Scope, receive: Receive) -> Any:
        """The stream's response, as the route makes it (or the app's answer to its
        error)."""
        scope["app"] = self.app  # as Starlette sets it: what request.app reads
        scope.setdefault("state", {})[TRACE_STATE] = trace_id
        scope[SHALLOW] = True  # the stream's body is written by this task (EventStream)
        request = Request(scope, receive)
        state = self.app.state
        core: ProgressCore = state.progress
        try:
            last_event_id = request.query_params.get("last_event_id")
            return await core.sse(request, state.videos, video_id, last_event_id)
        except Exception as exc:
            handler = handler_of(self.app, exc)
            if handler is None:
                raise
            return await handler(request, exc)


def route_path(scope: Scope) -> str:
    """The path as the app's routes see it: without the `root_path` a proxy mounts it
    under (uvicorn --root-path), as Starlette's routing reads it."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] == "/":
        return path[len(root) :]
    return path


def handler_of(app: Any, exc: Exception) -> Any:
    """The app's handler of `exc` as Starlette would pick it: the most specific class
    registered (`Exception`'s is the handler of unexpected errors)."""
    handlers: dict[Any, Any] = app.exception_handlers
    for cls in type(exc).__mro__:
        if cls in handlers:
            return handlers[cls]
    return None
