"""The public name of the worker's logger (docs/library.md):
`from kinora.events import SSELogger`. It lives in `kinora.streaming.events`."""

from kinora.streaming.events import Event
from kinora.streaming.logger import SSELogger

__all__ = ["Event", "SSELogger"]
