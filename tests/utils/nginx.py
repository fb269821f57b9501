"""Debian's nginx in front of Kinora's API processes, with the configurations the
repository keeps (deploy/nginx: kinora.conf over HTTP/1.1, kinora-https.conf over
HTTPS and HTTP/2), on ports of the caller's (`make test` installs nginx when it is
missing)."""

from __future__ import annotations

import contextlib
import os
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx

from kinora.cli.embedded import free_port
from tests.utils.processes import wait_for

ROOT = Path(__file__).resolve().parents[2]
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
DEPLOY = ROOT / "deploy" / "nginx"
# The ports the repository's configurations name, replaced by the caller's.
UPSTREAMS = ("127.0.0.1:8001", "127.0.0.1:8002")
LISTEN = {"kinora.conf": "127.0.0.1:8080", "kinora-https.conf": "127.0.0.1:8443"}


@contextlib.contextmanager
def front(
    root: Path, upstreams: list[int], *, https: bool = False, tls: Path | None = None
) -> Iterator[str]:
    """nginx on a free port, proxying to the two API processes on `upstreams`: its base
    URL, once it answers. With `https`, over TLS and HTTP/2, with the certificate in
    `tls` (kinora.crt, kinora.key), or else one for 127.0.0.1 made here, in `root`/tls
    (self-signed: a client trusts it by name)."""
    port = free_port()
    name = "kinora-https.conf" if https else "kinora.conf"
    conf = (DEPLOY / name).read_text()
    for configured, given in zip(UPSTREAMS, upstreams, strict=True):
        conf = conf.replace(configured, f"127.0.0.1:{given}")
    conf = conf.replace(f"listen {LISTEN[name]}", f"listen 127.0.0.1:{port}")
    (root / "nginx.conf").write_text(conf)
    shutil.copy(DEPLOY / "kinora-proxy.conf", root / "kinora-proxy.conf")
    if https and tls is not None:
        shutil.copytree(tls, root / "tls", dirs_exist_ok=True)
    elif https:
        certificate(root / "tls")
    settings = f"daemon off; pid {root}/nginx.pid; error_log {root}/error.log;"
    if os.geteuid() == 0:
        settings += " user root;"
    nginx = subprocess.Popen(
        [NGINX, "-p", str(root), "-c", str(root / "nginx.conf"), "-g", settings],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"{'https' if https else 'http'}://127.0.0.1:{port}"

    trust = ssl.create_default_context(cafile=root / "tls" / "kinora.crt") if https else True

    def up() -> bool:
        assert nginx.poll() is None, (root / "error.log").read_text()
        return status(f"{base}/healthz", trust) == 200

    try:
        wait_for("nginx", up, timeout=10)
        yield base
    finally:
        nginx.terminate()
        nginx.wait(10)


def certificate(folder: Path) -> None:
    """A self-signed certificate for 127.0.0.1 and its key, as kinora-https.conf names
    them (openssl's command, which Debian's nginx comes beside)."""
    folder.mkdir(exist_ok=True)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(folder / "kinora.key"), "-out", str(folder / "kinora.crt")],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip


def status(url: str, verify: ssl.SSLContext | bool = True) -> int:
    try:
        return httpx.get(url, timeout=2, verify=verify).status_code
    except httpx.TransportError:
        return 0
