"""Debian's nginx in front of Kinora's API processes, with the configuration the
repository keeps (deploy/nginx/kinora.conf), on ports of the caller's (`make test`
installs nginx when it is missing)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx

from kinora.cli.embedded import free_port
from tests.utils.processes import wait_for

ROOT = Path(__file__).resolve().parents[2]
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


@contextlib.contextmanager
def front(root: Path, upstreams: list[int]) -> Iterator[str]:
    """nginx on a free port, proxying to the two API processes on `upstreams`: its base
    URL, once it answers."""
    port = free_port()
    conf = (ROOT / "deploy" / "nginx" / "kinora.conf").read_text()
    conf = conf.replace("127.0.0.1:8001", f"127.0.0.1:{upstreams[0]}")
    conf = conf.replace("127.0.0.1:8002", f"127.0.0.1:{upstreams[1]}")
    conf = conf.replace("listen 127.0.0.1:8080", f"listen 127.0.0.1:{port}")
    (root / "nginx.conf").write_text(conf)
    settings = f"daemon off; pid {root}/nginx.pid; error_log {root}/error.log;"
    if os.geteuid() == 0:
        settings += " user root;"
    nginx = subprocess.Popen(
        [NGINX, "-p", str(root), "-c", str(root / "nginx.conf"), "-g", settings],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for("nginx", lambda: status(f"{base}/healthz") == 200, timeout=10)
        yield base
    finally:
        nginx.terminate()
        nginx.wait(10)


def status(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.TransportError:
        return 0
