"""The live-progress layer, usable by any FastAPI + Celery app (docs/library.md):

    from kinora.streaming import SSELogger, progress_router

`SSELogger` publishes a job's events from its Celery task; `progress_router` serves
them to browsers (SSE and WebSocket) and to pollers, on the app's ProgressCore;
`SQLStore` keeps a job's floor and outcome in the host's SQL database.
"""

from typing import TYPE_CHECKING, Any

from kinora.streaming.core import ProgressCore
from kinora.streaming.logger import SSELogger
from kinora.streaming.router import progress_router
from kinora.streaming.settings import StreamSettings
from kinora.streaming.sse import direct_writes

if TYPE_CHECKING:
    from kinora.streaming.sqlstore import SQLStore

__all__ = [
    "ProgressCore",
    "SQLStore",
    "SSELogger",
    "StreamSettings",
    "direct_writes",
    "progress_router",
]


def __getattr__(name: str) -> Any:
    # SQLStore needs SQLAlchemy, which the bare install does not bring.
    if name == "SQLStore":
        from kinora.streaming.sqlstore import SQLStore

        return SQLStore
    raise AttributeError(name)
