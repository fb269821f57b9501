"""A Redis that fails over, on 127.0.0.1: a primary, a replica and three Sentinels,
each a real process of Debian's Redis 7 (`make test` installs `redis-server` and
`redis-sentinel` when they are missing)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from kinora.cli.embedded import free_port

SERVICE = "kinora"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_SENTINEL = shutil.which("redis-sentinel") or "/usr/bin/redis-sentinel"


class SentinelSet:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.primary_port, self.replica_port = free_port(), free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.servers: dict[int, subprocess.Popen[bytes]] = {}
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}"

    def start(self) -> SentinelSet:
        self._server(self.primary_port)
        self._server(self.replica_port, "--replicaof", "127.0.0.1", str(self.primary_port))
        for port in self.sentinel_ports:
            conf = self.root / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.root}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary_port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 3000\n"
            )
            self.sentinels.append(self._spawn([REDIS_SENTINEL, str(conf)], f"sentinel-{port}"))
        # Ready to fail over once every Sentinel knows the replica and the two others
        # (they find each other through the primary, a hello every 2 s).
        self.wait(lambda: self.replicated() and self.primary() == self.primary_port, 20)
        self.wait(self.acquainted, 30)
        return self

    def acquainted(self) -> bool:
        for port in self.sentinel_ports:
            try:
                with redis.Redis(port=port, socket_timeout=1) as sentinel:
                    others = sentinel.sentinel_sentinels(SERVICE)
                    replicas = sentinel.sentinel_slaves(SERVICE)
            except redis.RedisError:
                return False
            if len(others) < 2 or not replicas:
                return False
        return True

    def _server(self, port: int, *args: str) -> None:
        self.servers[port] = self._spawn(
            [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.root), *args],
            f"redis-{port}",
        )  # fmt: skip

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen[bytes]:
        with (self.root / f"{name}.log").open("ab") as log:
            return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    def primary(self) -> int | None:
        """The primary's port as the Sentinels say it (the first that answers)."""
        for port in self.sentinel_ports:
            try:
                with redis.Redis(port=port, socket_timeout=1) as sentinel:
                    found = sentinel.sentinel_get_master_addr_by_name(SERVICE)
            except redis.RedisError:
                continue
            if found:
                return int(found[1])
        return None

    def replicated(self) -> bool:
        try:
            with redis.Redis(port=self.primary_port, socket_timeout=1) as primary:
                return int(primary.info("replication")["connected_slaves"]) >= 1
        except redis.RedisError:
            return False

    def fail_over(self, timeout: float = 30) -> float:
        """SIGKILL the primary; returns the seconds until the Sentinels name another."""
        killed = self.primary()
        assert killed is not None
        self.servers[killed].kill()
        self.servers[killed].wait(5)
        started = time.monotonic()
        self.wait(lambda: self.primary() not in (None, killed), timeout)
        return time.monotonic() - started

    def heal(self, timeout: float = 30) -> None:
        """The killed server comes back as the new primary's replica, and the set can
        fail over again."""
        primary = self.primary()
        assert primary is not None
        for port, process in self.servers.items():
            if process.poll() is not None:
                self._server(port, "--replicaof", "127.0.0.1", str(primary))

        def replicated() -> bool:
            try:
                with redis.Redis(port=primary, socket_timeout=1) as server:
                    return int(server.info("replication")["connected_slaves"]) >= 1
            except redis.RedisError:
                return False

        self.wait(replicated, timeout)

    @staticmethod
    def wait(check: object, timeout: float) -> None:
        assert callable(check)
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, "the Redis set did not get there in time"
            time.sleep(0.1)

    def stop(self) -> None:
        for process in [*self.sentinels, *self.servers.values()]:
            if process.poll() is None:
                process.terminate()
        for process in [*self.sentinels, *self.servers.values()]:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
