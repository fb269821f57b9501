"""Pure ASGI middleware (they wrap streaming responses without buffering them): a
trace id for every request, and a cap on request bodies."""

from __future__ import annotations

import re

import orjson
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kinora.core import logs

TRACE_HEADER = "X-Trace-Id"
TRACE_STATE = "trace_id"
STREAM_SUFFIX = "/stream"
# A caller's own id is kept when it is a sane token (a proxy's request id, say).
_GOOD_ID = re.compile(r"[A-Za-z0-9._\-]{8,64}")


class TraceMiddleware:
    """Gives each request a trace id (its OpenTelemetry trace's when traces are
    exported, kinora.core.tracing; else the caller's `X-Trace-Id` or `X-Request-Id` if
    well-formed, else a new one), binds it to every log line of the request, and
    returns it in the `X-Trace-Id` response header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        trace_id = self.trace_id(scope)
        # Also kept in the request's scope: the handler of unexpected errors runs in
        # Starlette's outermost middleware, after this one's log context has closed.
        scope.setdefault("state", {})[TRACE_STATE] = trace_id
        if scope["type"] == "websocket" or scope["path"].endswith(STREAM_SUFFIX):
            # `send` is not wrapped here: the wrapper would run for every event written
            # to every stream. The stream sets its header itself (api.stream).
            with logs.bind(trace_id=trace_id):
                await self.app(scope, receive, send)
            return
        header = (TRACE_HEADER.lower().encode(), trace_id.encode())

        async def send_with_trace(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.get("headers", [])
                if not any(name == header[0] for name, _ in headers):  # errors set it
                    message["headers"] = [*headers, header]
            await send(message)

        with logs.bind(trace_id=trace_id):
            await self.app(scope, receive, send_with_trace)

    @staticmethod
    def trace_id(scope: Scope) -> str:
        if logs.span_trace_id is not None and (traced := logs.span_trace_id()):
            return traced
        for name, value in scope["headers"]:
            if name in (b"x-trace-id", b"x-request-id"):
                candidate: str = value.decode("latin-1")
                if _GOOD_ID.fullmatch(candidate):
                    return candidate
        return logs.new_trace_id()


class BodyTooLarge(HTTPException):
    """An HTTPException, so that FastAPI passes it on from its body parsing (which
    turns other exceptions into a 400) to the API's error handler."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, detail=too_large(limit))


def too_large(limit: int) -> str:
    return f"request body is larger than {limit / 2**20:g} MB: send a smaller one"


class BodyLimitMiddleware:
    """Refuses a request body over `limit` bytes with a JSON 413: at once when its
    Content-Length says so, else as soon as the bytes read pass the limit.

    FastAPI's own `max_body_size` answers a declared oversize body in plain text
    ("Content Too Large") from outside every handler; the API's errors are JSON with
    a `detail` that says what to do (README, Try it with curl) and a trace id, hence this one.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await self._refuse(send)
                return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        # Only `receive` is wrapped: a wrapper of `send` would run for every event
        # written to every stream. BodyTooLarge, an HTTPException, is answered by the
        # app's exception handler.
        await self.app(scope, counting_receive, send)

    async def _refuse(self, send: Send) -> None:
        payload = orjson.dumps(
            {"detail": too_large(self.limit), "trace_id": logs.current_trace_id()}
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})
