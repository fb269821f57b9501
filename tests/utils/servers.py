"""An ASGI app served for real (uvicorn on 127.0.0.1) from a thread of the test's own
process: a streaming server without a subprocess."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from kinora.cli.embedded import free_port


@contextmanager
def serve(app: Any, timeout: float = 15) -> Iterator[str]:
    """Serve `app` (its lifespan included) until the block ends; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        assert thread.is_alive(), "the server exited at start-up"
        assert time.monotonic() < deadline, f"the server did not start in {timeout} s"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        assert not thread.is_alive(), "the server did not stop"
