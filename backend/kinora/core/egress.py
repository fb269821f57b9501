"""One guard for every URL Kinora fetches or calls: a reference image, a webhook
(README, Egress).

Checking a host as text misses `127.1`, `2130706433`, `0x7f000001`, `[::ffff:127.0.0.1]`,
`0.0.0.0` and every name that resolves inside; and a check followed by a second
resolution (the HTTP client's own) is open to DNS rebinding. So the guard:

- parses the URL strictly (http(s), a host, no spaces or control characters, bounded);
- reads the host as the OS would (`inet_aton` takes every IPv4 spelling above);
- resolves a name once and refuses it unless every address is public (IPv4-mapped,
  NAT64 and 6to4 IPv6 are judged by the IPv4 address inside);
- connects to the address it checked (the URL's host becomes that address; the name
  stays in the `Host` header and the TLS server name, so certificates still verify);
- checks each redirect hop again, and bounds the size and the time of the whole fetch;
- and says "refused" or "unreachable", never what an inside server answered.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass

import httpx

MAX_URL_LENGTH = 2048
MAX_REDIRECTS = 5
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class Refused(Exception):
    """The URL may not be fetched: malformed, or it leads to a non-public address.
    Final: the same URL is refused again."""


class Unreachable(Exception):
    """The URL could not be fetched now (no answer, a name that does not resolve, an
    answer that is not usable); the message says no more than that."""


def public(ip: IPAddress) -> bool:
    """An address on the public internet: not loopback, private, link-local, CGNAT,
    multicast, reserved or unspecified, whatever IPv6 form carries it."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or ip.sixtofour
        if inner is None and ip in _NAT64:
            inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if inner is not None:
            return public(inner)
    return ip.is_global and not ip.is_multicast


def literal_address(host: str) -> IPAddress | None:
    """The address a URL's host names as a number, in any form the OS accepts (dotted,
    shortened `127.1`, decimal, hex, octal, IPv6); None for a name."""
    host = host.strip("[]").rstrip(".")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def parse(url: str) -> httpx.URL:
    """The URL, or Refused saying what is wrong with it."""
    if len(url) > MAX_URL_LENGTH:
        raise Refused(f"is longer than {MAX_URL_LENGTH} characters")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise Refused("must not contain spaces or control characters")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        raise Refused("is not a valid URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise Refused("must be an http:// or https:// URL with a host")
    return parsed


def permitted(ip: IPAddress, allow_private: bool, allow: tuple[IPNetwork, ...]) -> bool:
    """Whether the guard lets a connection to `ip` through: a public address; any with
    `allow_private`; or one inside the networks `allow` names (one inside host, say)."""
    return allow_private or public(ip) or any(ip in network for network in allow)


def check(url: str, *, allow_private: bool, allow: tuple[IPNetwork, ...] = ()) -> httpx.URL:
    """What can be decided without DNS (at submit, a `422`): the URL is well formed, and
    unless `allow_private`, its host is neither localhost nor a non-public address in
    any spelling. A name is judged when it is resolved, at each fetch."""
    parsed = parse(url)
    if allow_private:
        return parsed
    host = parsed.host.rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        raise Refused("must not be localhost")
    ip = literal_address(host)
    if ip is not None and not permitted(ip, allow_private, allow):
        raise Refused("must not be a loopback, private or link-local address")
    return parsed


def resolve(
    parsed: httpx.URL, *, allow_private: bool, allow: tuple[IPNetwork, ...] = ()
) -> IPAddress:
    """The address to connect to: the host's, resolved once, every address checked."""
    ip = literal_address(parsed.host)
    if ip is not None:
        addresses = [ip]
    else:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            infos = socket.getaddrinfo(parsed.host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            raise Unreachable("its host name does not resolve") from None
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    if not all(permitted(a, allow_private, allow) for a in addresses):
        raise Refused("its host is not a public address")
    return addresses[0]


@dataclass(frozen=True)
class Answer:
    status_code: int
    content: bytes


def fetch(
    method: str,
    url: str,
    *,
    allow_private: bool,
    timeout: float,
    max_bytes: int,
    headers: Mapping[str, str] | None = None,
    content: bytes | None = None,
    follow_redirects: bool = False,
    allow: tuple[IPNetwork, ...] = (),
) -> Answer:
    """One request through the guard, the whole of it (redirects included) within
    `timeout` seconds and `max_bytes` of body. Raises Refused or Unreachable."""
    deadline = time.monotonic() + timeout
    with httpx.Client(trust_env=False, follow_redirects=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            parsed = check(url, allow_private=allow_private, allow=allow)
            ip = resolve(parsed, allow_private=allow_private, allow=allow)
            left = deadline - time.monotonic()
            if left <= 0:
                raise Unreachable("it did not answer in time")
            request = client.build_request(
                method,
                parsed.copy_with(host=str(ip)),
                headers={**(headers or {}), "Host": parsed.netloc.decode("ascii")},
                content=content,
                timeout=httpx.Timeout(left, connect=min(left, 5.0)),
                extensions={"sni_hostname": parsed.host} if parsed.scheme == "https" else {},
            )
            try:
                response = client.send(request, stream=True)
                try:
                    if follow_redirects and response.is_redirect:
                        try:
                            url = str(parsed.join(response.headers.get("location", "")))
                        except httpx.InvalidURL:
                            raise Refused("it redirects to a malformed URL") from None
                        continue
                    return Answer(response.status_code, _read(response, max_bytes, deadline))
                finally:
                    response.close()
            except httpx.TimeoutException:
                raise Unreachable("it did not answer in time") from None
            except (httpx.HTTPError, OSError):
                raise Unreachable("it could not be reached") from None
    raise Refused(f"redirects more than {MAX_REDIRECTS} times")


def _read(response: httpx.Response, max_bytes: int, deadline: float) -> bytes:
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise Refused(f"its answer is larger than {max_bytes // 2**20} MB")
        if time.monotonic() > deadline:
            raise Unreachable("it did not answer in time")
        chunks.append(chunk)
    return b"".join(chunks)
