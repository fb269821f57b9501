"""A Redis Cluster on 127.0.0.1: three shards (a primary each, and a replica each when
asked), every node a real process of Debian's Redis 7 (`make test` installs
`redis-server`, whose package brings `redis-cli`), joined by `redis-cli --cluster
create`."""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import redis

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
# How long a primary may be silent before its replica takes over (the cluster's own
# default is 15 s).
NODE_TIMEOUT_MS = 1000


@contextlib.contextmanager
def plain_server(root: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """One Redis server, not clustered (a queue beside a cluster; a baseline): its URL
    and its process."""
    port = bus_free_port()
    server = subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(root)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        ClusterSet.wait(lambda: ClusterSet._answers(port), 10)
        yield f"redis://127.0.0.1:{port}/0", server
    finally:
        server.terminate()
        server.wait(10)


def bus_free_port() -> int:
    """A free port whose cluster bus port (10000 above it) is free too."""
    while True:
        port = random.randint(20_000, 45_000)
        try:
            for candidate in (port, port + 10_000):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port


class ClusterSet:
    def __init__(self, root: Path, shards: int = 3, replicas: int = 0) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.replicas = replicas
        self.ports: list[int] = []
        while len(self.ports) < shards * (1 + replicas):
            port = bus_free_port()
            if port not in self.ports:
                self.ports.append(port)
        self.servers: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:2])

    def start(self) -> ClusterSet:
        for port in self.ports:
            self._server(port)
        self.wait(lambda: all(self._answers(port) for port in self.ports), 10)
        subprocess.run(
            [REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        self.wait(self.healthy, 30)
        return self

    def _server(self, port: int) -> None:
        with (self.root / f"redis-{port}.log").open("ab") as log:
            self.servers[port] = subprocess.Popen(
                [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.root), "--cluster-enabled", "yes",
                 "--cluster-config-file", f"nodes-{port}.conf",
                 "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                 "--cluster-replica-validity-factor", "0"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    @staticmethod
    def _answers(port: int) -> bool:
        try:
            with redis.Redis(port=port, socket_timeout=1) as node:
                return bool(node.ping())
        except redis.RedisError:
            return False

    def nodes(self) -> list[dict[str, object]]:
        """CLUSTER NODES as one live node sees it: port, role, slot ranges, failed."""
        for port, process in self.servers.items():
            if process.poll() is not None:
                continue
            try:
                with redis.Redis(port=port, socket_timeout=1) as node:
                    text = node.execute_command("CLUSTER NODES")
            except redis.RedisError:
                continue
            if isinstance(text, bytes):
                text = text.decode()
            if isinstance(text, dict):  # redis-py parses it into {address: fields}
                return [
                    {"port": int(str(address).rsplit(":", 1)[1].split("@")[0]),
                     "primary": "master" in str(fields["flags"]),
                     "failed": "fail" in str(fields["flags"]),
                     "slots": fields["slots"]}
                    for address, fields in text.items()
                ]  # fmt: skip
        return []

    def primaries(self) -> list[int]:
        return sorted(int(str(n["port"])) for n in self.nodes() if n["primary"] and not n["failed"])

    def healthy(self) -> bool:
        for port, process in self.servers.items():
            if process.poll() is not None:
                continue
            try:
                with redis.Redis(port=port, socket_timeout=1) as node:
                    info = node.execute_command("CLUSTER INFO")
            except redis.RedisError:
                return False
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" not in text and "'cluster_state': 'ok'" not in text:
                return False
        return True

    def owner(self, key: str) -> int:
        """The port of the primary that owns `key`'s slot now."""
        with redis.Redis(port=self.primaries()[0], socket_timeout=1) as node:
            slot = int(node.execute_command("CLUSTER KEYSLOT", key))
        for found in self.nodes():
            if not found["primary"] or found["failed"]:
                continue
            for span in found["slots"]:  # type: ignore[attr-defined]
                low, high = (int(x) for x in span) if len(span) == 2 else (int(span[0]),) * 2
                if low <= slot <= high:
                    return int(str(found["port"]))
        raise AssertionError(f"no primary owns slot {slot}")

    def fail_over(self, port: int, timeout: float = 30) -> float:
        """SIGKILL the primary on `port`; returns the seconds until the cluster is whole
        again (its replica promoted)."""
        self.servers[port].kill()
        self.servers[port].wait(5)
        started = time.monotonic()
        self.wait(lambda: port not in self.primaries() and len(self.primaries()) == 3, timeout)
        self.wait(self.healthy, timeout)
        return time.monotonic() - started

    @staticmethod
    def wait(check: object, timeout: float) -> None:
        assert callable(check)
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, "the cluster did not get there in time"
            time.sleep(0.1)

    def stop(self) -> None:
        for process in self.servers.values():
            if process.poll() is None:
                process.terminate()
        for process in self.servers.values():
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
