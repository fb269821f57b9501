"""The live-progress layer, usable by any FastAPI + Celery app (docs/library.md):

    from kinora.streaming import SSELogger, progress_router

`SSELogger` publishes a job's events from its Celery task; `progress_router` serves
them to browsers (SSE and WebSocket) and to pollers.
"""

from kinora.streaming.logger import SSELogger
from kinora.streaming.router import progress_router
from kinora.streaming.sse import direct_writes

__all__ = ["SSELogger", "direct_writes", "progress_router"]
