"""A Redis server that speaks TLS only and knows one ACL user (the default user off),
on 127.0.0.1: Debian's Redis 7, a certificate authority and a server certificate made
with openssl for the test."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis

from kinora.cli.embedded import free_port
from tests.utils.sentinel import REDIS_SERVER

USER, PASSWORD = "kinora", "s3cret-for-tests"


class TlsRedis:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def ca(self) -> Path:
        return self.root / "ca.pem"

    @property
    def url(self) -> str:
        return (
            f"rediss://{USER}:{PASSWORD}@127.0.0.1:{self.port}/0"
            f"?ssl_cert_reqs=required&ssl_ca_certs={self.ca}"
        )

    def start(self) -> TlsRedis:
        self._certificates()
        conf = self.root / "redis.conf"
        conf.write_text(
            f"port 0\ntls-port {self.port}\nbind 127.0.0.1\ndir {self.root}\n"
            f"tls-cert-file {self.root / 'server.pem'}\ntls-key-file {self.root / 'server.key'}\n"
            f'tls-ca-cert-file {self.ca}\ntls-auth-clients no\nsave ""\n'
            f"user default off\nuser {USER} on >{PASSWORD} ~* &* +@all\n"
        )
        with (self.root / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(
                [REDIS_SERVER, str(conf)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 10
        while True:
            try:
                with redis.Redis.from_url(self.url, socket_timeout=1) as client:
                    client.ping()
                return self
            except redis.RedisError:
                assert time.monotonic() < deadline, (self.root / "redis.log").read_text()
                time.sleep(0.05)

    def _certificates(self) -> None:
        def run(*args: str) -> None:
            subprocess.run(["openssl", *args], cwd=self.root, check=True, capture_output=True)

        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=kinora-test-ca", "-keyout", "ca.key", "-out", "ca.pem")  # fmt: skip
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", "server.key", "-out", "server.csr")  # fmt: skip
        (self.root / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
        run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf",
            "-out", "server.pem")  # fmt: skip

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(5)
