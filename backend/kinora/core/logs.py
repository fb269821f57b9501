"""Logging for every Kinora process: text for a terminal, JSON lines in production
(`LOG_FORMAT=json`), a trace id and video id on every line of a request or a job, and
no token ever written out.

The trace id and video id live in context variables: set once where a request or a
job starts (`bind`), they reach every line logged beneath it, in any module, without
being passed along. Secrets are scrubbed by a handler filter, so they are removed
from every logger's lines, uvicorn's access log (whose URLs carry `?token=`) included.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable
from contextvars import ContextVar, Token
from typing import IO, Literal

from pythonjsonlogger.json import JsonFormatter

trace_id_var: ContextVar[str | None] = ContextVar("trace_id", default=None)
video_id_var: ContextVar[int | None] = ContextVar("video_id", default=None)

# API tokens (kin_...), scoped tokens (kvs2.<video>.<user>.<issued>.<expiry>.<signature>), and
# any `token=`/Bearer value whatever its shape.
_SECRETS = re.compile(
    r"kin_[A-Za-z0-9_\-]{8,}"
    r"|kvs[12]\.[0-9]+(?:\.[0-9]+){2,3}\.[A-Za-z0-9_\-]+"
    r"|(?<=token=)[^&\s\"']+"
    r"|(?<=Bearer )[^\s\"']+",
    re.IGNORECASE,
)
REDACTED = "[redacted]"


def redact(text: str) -> str:
    return _SECRETS.sub(REDACTED, text)


# The current span's trace id, when this process exports traces (kinora.core.tracing).
span_trace_id: Callable[[], str | None] | None = None


def new_trace_id() -> str:
    return str(uuid.uuid4())


def current_trace_id() -> str | None:
    return trace_id_var.get()


class bind:
    """Within the block, every log line carries these ids. (A class, not a generator:
    every open stream holds one, and a generator's frame is several times its size.)"""

    __slots__ = ("_trace", "_video", "trace_id", "video_id")

    def __init__(self, *, trace_id: str | None = None, video_id: int | None = None) -> None:
        self.trace_id, self.video_id = trace_id, video_id
        self._trace: Token[str | None] | None = None
        self._video: Token[int | None] | None = None

    def __enter__(self) -> None:
        if self.trace_id is not None:
            self._trace = trace_id_var.set(self.trace_id)
        if self.video_id is not None:
            self._video = video_id_var.set(self.video_id)

    def __exit__(self, *exc: object) -> None:
        if self._video is not None:
            video_id_var.reset(self._video)
        if self._trace is not None:
            trace_id_var.reset(self._trace)


class ContextFilter(logging.Filter):
    """Adds the ids of the current request or job, and scrubs secrets from the line
    (formatted here once, so that arguments are scrubbed too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.trace_id = trace_id_var.get()
        record.video_id = video_id_var.get()
        record.__dict__.pop("color_message", None)  # uvicorn's terminal colours: noise
        message = record.getMessage()
        clean = redact(message)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        return True


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = [
            f"{name}={value}"
            for name in ("video_id", "trace_id")
            if (value := getattr(record, name, None)) is not None
        ]
        return f"{line} [{' '.join(ids)}]" if ids else line

    def formatException(self, ei: object) -> str:
        return redact(super().formatException(ei))  # type: ignore[arg-type]


class JsonLineFormatter(JsonFormatter):
    def formatException(self, ei: object) -> str:
        return redact(super().formatException(ei))  # type: ignore[arg-type]


def make_handler(fmt: Literal["text", "json"], stream: IO[str] | None = None) -> logging.Handler:
    handler = logging.StreamHandler(stream)
    if fmt == "json":
        handler.setFormatter(
            JsonLineFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s %(trace_id)s %(video_id)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(ContextFilter())
    return handler


def configure(fmt: Literal["text", "json"] = "text", level: str = "INFO") -> None:
    """One handler on the root logger, which every logger (uvicorn's and Celery's
    too) propagates to. Calling it again replaces the handler, never adds one."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "kinora", False):
            root.removeHandler(handler)
    handler = make_handler(fmt)
    handler.kinora = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.getLogger("httpx").setLevel(logging.WARNING)  # each request of a client: noise
