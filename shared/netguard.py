"""Where ragq may send HTTP requests of its own (batch callbacks): public addresses only, unless allowed."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit


def non_public_reason(url: str) -> str | None:
    """Why `url` must not be called: its host is missing, does not resolve, or resolves to a loopback, private,
    link-local or otherwise non-public address (a callback there would let a client probe the server's
    network). None when every address it resolves to is public."""
    host = urlsplit(url).hostname
    if not host:
        return "has no host"
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
    except (OSError, UnicodeError):
        return f"host {host!r} does not resolve"
    for address in sorted(addresses):
        if not ipaddress.ip_address(address.split("%")[0]).is_global:
            return f"host {host!r} is a non-public address ({address})"
    return None
