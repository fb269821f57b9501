"""The egress guard (README, Egress): every spelling of an inside address is
refused before anything connects, a redirect hop is checked again, the connection goes
to the address that was checked, and what an inside server answered is never told.

Recording listeners on loopback see every request that reached them. Only names the
hosts file answers are used (`localhost`, this machine's own name): a name that needs
DNS would send a query off the machine. The rebinding test answers its one made-up
name itself, as a DNS server that changes its answer would."""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from kinora.core import egress

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32


class Listener:
    """An HTTP server on `host` that records each request's path and Host header and
    answers `status` (a redirect to `location` if given, else the PNG)."""

    def __init__(self, host: str = "127.0.0.1", status: int = 200, location: str = "") -> None:
        self.seen: list[tuple[str, str]] = []
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                listener.seen.append((self.path, self.headers.get("Host", "")))
                self.send_response(status)
                if location:
                    self.send_header("Location", location)
                self.send_header("Content-Length", str(len(PNG)))
                self.end_headers()
                self.wfile.write(PNG)

            do_POST = do_GET

            def log_message(self, *args: Any) -> None:
                pass

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        ThreadingHTTPServer.address_family = family
        self.server = ThreadingHTTPServer((host, 0), Handler)
        ThreadingHTTPServer.address_family = socket.AF_INET
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener(status=404)
    yield server
    server.close()


@pytest.fixture
def listener6() -> Iterator[Listener]:
    server = Listener("::1", status=404)
    yield server
    server.close()


SPELLINGS = [
    "127.0.0.1", "127.1", "2130706433", "0x7f000001", "0x7f.1", "017700000001",
    "[::ffff:127.0.0.1]", "localhost", "LOCALHOST", "localhost.", "0.0.0.0", "0",
    "user@127.0.0.1", "user:pw@127.1", "127.0.0.1.",
]  # fmt: skip


@pytest.mark.parametrize("host", SPELLINGS)
def test_every_spelling_of_loopback_is_refused_and_nothing_connects(
    listener: Listener, host: str
) -> None:
    url = f"http://{host}:{listener.port}/secret"
    with pytest.raises(egress.Refused):
        egress.check(url, allow_private=False)  # at submit: a 422
    with pytest.raises(egress.Refused) as refused:
        egress.fetch("GET", url, allow_private=False, timeout=5, max_bytes=2**20)
    assert listener.seen == []
    assert "404" not in str(refused.value)


def test_a_name_the_hosts_file_maps_inside_is_refused_when_resolved(listener: Listener) -> None:
    """This machine's own name passes the check made without DNS (it is a name), and is
    refused once resolved, before anything connects."""
    url = f"http://{socket.gethostname()}:{listener.port}/secret"
    egress.check(url, allow_private=False)
    with pytest.raises(egress.Refused, match="not a public address") as refused:
        egress.fetch("GET", url, allow_private=False, timeout=5, max_bytes=2**20)
    assert listener.seen == []
    assert "127." not in str(refused.value)  # what the name resolves to is not told


def test_ipv6_loopback_is_refused(listener6: Listener) -> None:
    with pytest.raises(egress.Refused):
        egress.fetch(
            "GET", f"http://[::1]:{listener6.port}/", allow_private=False, timeout=5,
            max_bytes=2**20,
        )  # fmt: skip
    assert listener6.seen == []


@pytest.mark.parametrize(
    "address",
    ["10.0.0.1", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "224.0.0.1",
     "240.0.0.1", "255.255.255.255", "::", "fe80::1", "fc00::1", "ff02::1",
     "::ffff:10.0.0.1", "64:ff9b::7f00:1", "2002:7f00:1::"],
)  # fmt: skip
def test_no_inside_range_counts_as_public(address: str) -> None:
    assert not egress.public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_public(address: str) -> None:
    assert egress.public(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://x\r\nHost: evil/", "control characters"),
        ("http://exa mple.com/", "spaces"),
        ("http://" + "a" * 3000 + ".com/", "longer than 2048"),
        ("ftp://example.com/", "http:// or https://"),
        ("http:///path-only", "with a host"),
        ("http://[::1/", "not a valid URL"),
    ],
)
def test_a_malformed_url_says_what_is_wrong(url: str, why: str) -> None:
    with pytest.raises(egress.Refused, match=why.replace("/", ".")):
        egress.check(url, allow_private=True)


def test_each_redirect_hop_is_checked_again() -> None:
    """A host let through (127.0.0.2, as an operator might allow one inside host)
    redirects to another inside address: the hop is refused and never reached."""
    inside = Listener("127.0.0.1")
    allowed = Listener("127.0.0.2", status=302, location=f"http://127.0.0.1:{inside.port}/")
    try:
        with pytest.raises(egress.Refused):
            egress.fetch(
                "GET", f"http://127.0.0.2:{allowed.port}/img", allow_private=False,
                timeout=5, max_bytes=2**20, follow_redirects=True,
                allow=(ipaddress.ip_network("127.0.0.2/32"),),
            )  # fmt: skip
        assert len(allowed.seen) == 1
        assert inside.seen == []
    finally:
        inside.close()
        allowed.close()


def test_the_connection_goes_to_the_address_that_was_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DNS rebinding: the name answers an allowed address when checked and an inside one
    to any later lookup. The request lands on the checked address, with the name in its
    Host header; the other listener sees nothing."""
    checked = Listener("127.0.0.2")
    inside = Listener("127.0.0.1", status=404)
    real = socket.getaddrinfo
    answers = iter(["127.0.0.2"])

    def rebinding(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "rebind.kinora.test":
            return real(next(answers, "127.0.0.1"), port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    try:
        answer = egress.fetch(
            "GET", f"http://rebind.kinora.test:{checked.port}/img", allow_private=False,
            timeout=5, max_bytes=2**20, allow=(ipaddress.ip_network("127.0.0.2/32"),),
        )  # fmt: skip
        assert answer.status_code == 200
        assert answer.content == PNG
        assert checked.seen == [("/img", f"rebind.kinora.test:{checked.port}")]
        assert inside.seen == []
    finally:
        checked.close()
        inside.close()


def test_size_is_bounded() -> None:
    server = Listener("127.0.0.2")
    try:
        with pytest.raises(egress.Refused, match="larger than"):
            egress.fetch(
                "GET", f"http://127.0.0.2:{server.port}/", allow_private=True, timeout=5,
                max_bytes=10,
            )  # fmt: skip
    finally:
        server.close()


def test_an_unreachable_url_tells_nothing_of_why() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once this closes
    with pytest.raises(egress.Unreachable) as unreachable:
        egress.fetch(
            "GET", f"http://127.0.0.1:{port}/", allow_private=True, timeout=5, max_bytes=10
        )
    assert str(unreachable.value) == "it could not be reached"
