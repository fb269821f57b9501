"""A throwaway PostgreSQL server for the tests, on 127.0.0.1 and a free port.

Started with the machine's `initdb`/`pg_ctl` (PostgreSQL refuses to run as root, so
as root they run as the `postgres` user), fsync off, stopped and deleted at the end.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg

from kinora.cli.embedded import free_port


class ThrowawayPostgres:
    def __init__(self) -> None:
        self.port = free_port()
        self.base = Path(tempfile.mkdtemp(prefix="kinora-pg-"))
        self.data = self.base / "data"
        self.prefix: list[str] = []

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/kinora"

    def _run(self, *args: str) -> None:
        subprocess.run([*self.prefix, *args], check=True, capture_output=True, timeout=120)

    def start(self) -> ThrowawayPostgres:
        if shutil.which("initdb") is None or shutil.which("pg_ctl") is None:
            raise RuntimeError(
                "PostgreSQL's initdb and pg_ctl are not on PATH: install PostgreSQL "
                "(Debian: apt-get install postgresql) to run the PostgreSQL tests"
            )
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.base, user.pw_uid, user.pw_gid)
            self.prefix = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync")
        options = (
            f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run(
            "pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.base / "log"), "-w",
            "-t", "60", "start",
        )  # fmt: skip
        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True
        ) as conn:
            conn.execute("CREATE DATABASE kinora")
        return self

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.base, ignore_errors=True)
