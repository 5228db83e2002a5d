"""Where ragq may send HTTP requests of its own (batch callbacks): public addresses on allowed ports only.

Guarantees: a callback URL is parsed once, here, with urllib3's parser, and refused when it could be read two
ways (userinfo, backslashes, percent-encoded or non-ASCII hosts, numeric hosts in anything but dotted-quad
form, trailing dots, schemes other than http and https). Its host is resolved once; every address must be
global (`ipaddress`'s `is_global`, and not multicast or reserved, IPv4 inside IPv6 unwrapped), unless
`RAGQ_CALLBACK_ALLOW_PRIVATE=1`, and on a global address the port must be one of `RAGQ_CALLBACK_PORTS`.
The sender connects to the address that was checked (`Destination.address`), never resolving the name again,
so a name re-pointed in between (DNS rebinding) changes nothing.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

DEFAULT_PORTS = "80,443"
SCHEME_PORTS = {"http": 80, "https": 443}
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
# A last label that looks like a number makes the whole host an IPv4 address to browsers and C's inet_aton.
_NUMERIC_LABEL = re.compile(r"(0x[0-9a-f]*|[0-9]+)")
# NAT64 (RFC 6052) carries an IPv4 address in its last 32 bits.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class RefusedURL(ValueError):
    """A callback URL ragq will not call; the message says why."""


@dataclass(frozen=True)
class Destination:
    """Where to send a callback: the checked `address` to connect to, and the name to send as Host and SNI."""

    scheme: str
    host: str
    port: int
    target: str
    address: str

    @property
    def host_header(self) -> str:
        """The Host header: the host, with the port unless it is the scheme's default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == SCHEME_PORTS[self.scheme] else f"{host}:{self.port}"


def parse_ports(text: str) -> frozenset[int]:
    """The ports of `RAGQ_CALLBACK_PORTS` (`80,443`); ValueError when one is not a port number."""
    ports = set()
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or not 1 <= int(part) <= 65535:
            raise ValueError(f"{part!r} is not a port number (1..65535)")
        ports.add(int(part))
    return frozenset(ports)


def _authority(url: str) -> str:
    rest = url.split("://", 1)[1] if "://" in url else ""
    return re.split(r"[/?#]", rest, maxsplit=1)[0]


def parse_callback_url(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, request target) of `url`, without resolving anything; RefusedURL when it is
    ambiguous or not plain http(s) to a host name or an IP address."""
    if not url.isascii() or any(c <= " " or c == "\x7f" for c in url):
        raise RefusedURL("has non-ASCII, space or control characters (write a host in IDNA as xn--…)")
    if "\\" in url:
        raise RefusedURL("has a backslash")
    authority = _authority(url)
    if "@" in authority:
        raise RefusedURL("has userinfo (user@host)")
    if "%" in authority:
        raise RefusedURL("has a percent-encoded host")
    try:
        parsed = parse_url(url)
    except LocationParseError as exc:
        raise RefusedURL("cannot be parsed") from exc
    scheme = (parsed.scheme or "").lower()
    if scheme not in SCHEME_PORTS:
        raise RefusedURL("is not http:// or https://")
    if parsed.auth is not None:
        raise RefusedURL("has userinfo (user@host)")
    host = (parsed.host or "").lower()
    if not host:
        raise RefusedURL("has no host")
    port = parsed.port if parsed.port is not None else SCHEME_PORTS[scheme]
    if authority.endswith(":") or not 1 <= port <= 65535:
        raise RefusedURL("has an invalid port")
    target = (parsed.path or "/") + (f"?{parsed.query}" if parsed.query is not None else "")
    return scheme, _checked_host(host), port, target


def _checked_host(host: str) -> str:
    if host.startswith("["):
        try:
            return str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError as exc:
            raise RefusedURL(f"has an invalid IPv6 host {host!r}") from exc
    labels = host.split(".")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        # Only the one unambiguous spelling of an IPv4 address: no 2130706433, 0177.0.0.1, 0x7f.1, 127.1.
        try:
            address = ipaddress.IPv4Address(host)
        except ValueError as exc:
            raise RefusedURL(f"host {host!r} is a number but not a dotted-quad IPv4 address") from exc
        if str(address) != host:
            raise RefusedURL(f"host {host!r} is not written as a plain dotted-quad IPv4 address")
        return host
    if host.endswith("."):
        raise RefusedURL(f"host {host!r} ends with a dot")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise RefusedURL(f"host {host!r} is not a valid host name")
    if host == "localhost" or host.endswith(".localhost"):
        raise RefusedURL(f"host {host!r} is a non-public address (localhost)")
    return host


def is_public(address: str) -> bool:
    """Whether `address` is a global unicast address (IPv4 carried inside IPv6 is judged as IPv4)."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = [ip.ipv4_mapped, ip.sixtofour]
        if ip.teredo:
            embedded.extend(ip.teredo)
        if ip in _NAT64:
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if any(inner is not None and not is_public(str(inner)) for inner in embedded):
            return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified or ip.is_link_local)


def _resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as exc:
        raise RefusedURL(f"host {host!r} does not resolve") from exc
    # Scope ids (fe80::1%eth0) stripped: such an address is link-local, refused anyway.
    addresses = list(dict.fromkeys(str(info[4][0]).split("%")[0] for info in infos))
    if not addresses:
        raise RefusedURL(f"host {host!r} does not resolve")
    return addresses


def destination(url: str, ports: frozenset[int] | str = DEFAULT_PORTS, allow_private: bool = False) -> Destination:
    """Where a callback to `url` goes: parsed, resolved once and checked; RefusedURL if it may not be called.
    Every address the name resolves to must pass (the first is used), so a name with one private address among
    public ones is refused."""
    allowed = parse_ports(ports) if isinstance(ports, str) else ports
    scheme, host, port, target = parse_callback_url(url)
    addresses = _resolve(host, port)
    private = [a for a in addresses if not is_public(a)]
    if private and not allow_private:
        raise RefusedURL(f"host {host!r} is a non-public address ({private[0]})")
    if not private and port not in allowed:
        raise RefusedURL(f"port {port} is not allowed (RAGQ_CALLBACK_PORTS: {','.join(map(str, sorted(allowed)))})")
    return Destination(scheme, host, port, target, addresses[0])


def non_public_reason(url: str, ports: frozenset[int] | str = DEFAULT_PORTS, allow_private: bool = False) -> str | None:
    """Why `url` must not be called (see `destination`), or None when it may be."""
    try:
        destination(url, ports, allow_private)
    except RefusedURL as exc:
        return str(exc)
    return None
