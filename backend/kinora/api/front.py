"""A video's SSE stream served as a bare ASGI app, in front of FastAPI's routing.

A reconnect storm opens thousands of streams a second, and each one that goes through
FastAPI walks its routes, solves the route's dependencies (the path and query
parameters' validation, the bearer scheme), and sets up its exception handling and
exit stacks: objects that each open stream allocates and the garbage collector walks.
This answers the one route that storms hit, `GET|HEAD /api/v1/videos/{id}/stream`,
with the same call the FastAPI route makes (ProgressCore.sse), inside the app's own
middleware (the trace id, CORS, the body cap) and with the app's own error handlers:
the same answers, the route still in /docs. Anything else, and an id FastAPI would
refuse or read differently (`007`, out of range), goes on to FastAPI.
"""

from __future__ import annotations

import re
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from kinora.api.deps import MAX_ID
from kinora.streaming.core import ProgressCore

# The path FastAPI matches as the stream route (api.stream), for the ids it accepts
# as written: no sign, no leading zero.
STREAM_PATH = re.compile(r"/api/v1/videos/([1-9][0-9]{0,18})/stream")
METHODS = ("GET", "HEAD")


class StreamFront:
    """Serves the video stream route itself; passes every other request to `app`. Add
    it as the innermost middleware: it runs inside the others, outside FastAPI's
    exception handling, whose handlers it asks for the errors it meets."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in METHODS:
            match = STREAM_PATH.fullmatch(route_path(scope))
            if match is not None and int(match[1]) <= MAX_ID:
                await self.stream(match[1], scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def stream(self, video_id: str, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        state = scope["app"].state
        core: ProgressCore = state.progress
        last_event_id = request.query_params.get("last_event_id")
        try:
            response = await core.sse(request, state.videos, video_id, last_event_id)
        except Exception as exc:
            handler = handler_of(scope["app"], exc)
            if handler is None:
                raise  # to the app's handler of unexpected errors, as from a route
            response = await handler(request, exc)
        await response(scope, receive, send)


def route_path(scope: Scope) -> str:
    """The path as the app's routes see it: without the `root_path` a proxy mounts it
    under (uvicorn --root-path), as Starlette's routing reads it."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] == "/":
        return path[len(root) :]
    return path


def handler_of(app: Any, exc: Exception) -> Any:
    """The app's handler of `exc` as its exception middleware would pick it (the most
    specific class registered), but not the catch-all one of `Exception`, which the
    app's outermost middleware runs."""
    handlers: dict[Any, Any] = app.exception_handlers
    for cls in type(exc).__mro__:
        if cls is Exception:
            return None
        if cls in handlers:
            return handlers[cls]
    return None
