"""The callback address guard, attacked: every spelling of a non-public address is refused, the URL is read
once (as the sender reads it), and the sender connects to the address that was checked."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from shared import netguard
from shared.netguard import RefusedURL, destination, non_public_reason
from tests.helpers import Receiver, free_port, self_signed_certificate
from worker.callbacks import post

PUBLIC_IP = "93.184.216.34"
# Names an attacker controls, pointed wherever they like; everything else does not resolve (tests run offline).
FAKE_DNS = {
    "public.example": [PUBLIC_IP],
    "private.example": ["10.1.2.3"],
    "loopback.example": ["127.0.0.1"],
    "metadata.example": ["169.254.169.254"],
    "mapped.example": ["::ffff:127.0.0.1"],
    "mixed.example": [PUBLIC_IP, "192.168.0.10"],
}


def _fake_getaddrinfo(host: str, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
    if isinstance(host, bytes):
        host = host.decode()
    addresses = FAKE_DNS.get(host)
    if addresses is None:
        try:
            addresses = [str(__import__("ipaddress").ip_address(host))]
        except ValueError:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known") from None
    return [
        (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port or 0)) for a in addresses
    ]


@pytest.fixture(autouse=True)
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", _fake_getaddrinfo)


NON_PUBLIC = [
    # The parser difference: urlsplit reads public.example, urllib3 (the sender) reads 127.0.0.1.
    "http://127.0.0.1:8080\\@public.example/cb",
    "http://public.example\\@127.0.0.1/cb",
    "http://127.0.0.1\\.public.example/",
    # Userinfo in any form.
    "http://public.example@127.0.0.1/",
    "http://user:pw@public.example/",
    "http://public.example:80@127.0.0.1/",
    "http://@public.example/",
    # IPv4 spelled as one number, octal, hex, short forms.
    "http://2130706433/",
    "http://0177.0.0.1/",
    "http://0x7f.1/",
    "http://0x7f000001/",
    "http://127.1/",
    "http://0/",
    "http://017700000001/",
    "http://1.2.3.0x4/",
    # Loopback, unspecified, private, link-local (cloud metadata), CGNAT, multicast, broadcast, reserved.
    "http://127.0.0.1/",
    "http://0.0.0.0/",
    "http://10.0.0.7/",
    "http://172.16.0.1/",
    "http://192.168.1.1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://100.64.0.1/",
    "http://100.127.255.254/",
    "http://224.0.0.1/",
    "http://239.255.255.250/",
    "http://255.255.255.255/",
    "http://240.0.0.1/",
    "http://198.18.0.1/",
    # IPv6: loopback, unspecified, IPv4-mapped/compatible, 6to4, NAT64, Teredo, ULA, link-local, multicast.
    "http://[::1]/",
    "http://[::]/",
    "http://[0:0:0:0:0:0:0:1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[0:0:0:0:0:ffff:7f00:1]/",
    "http://[::ffff:8.8.8.8]/",
    "http://[::127.0.0.1]/",
    "http://[2002:7f00:1::]/",
    "http://[64:ff9b::7f00:1]/",
    "http://[64:ff9b::a9fe:a9fe]/",
    "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/",
    "http://[fc00::1]/",
    "http://[fd12:3456::1]/",
    "http://[fe80::1]/",
    "http://[fe80::1%25eth0]/",
    "http://[ff02::1]/",
    # Names.
    "http://localhost/",
    "http://LOCALHOST/",
    "http://localhost./",
    "http://foo.localhost/",
    "http://loopback.example/",
    "http://private.example/",
    "http://metadata.example/",
    "http://mapped.example/",
    "http://mixed.example/",
    "http://public.example./",
    "http://does-not-resolve.example/",
    # Percent-encoding, IDNA and Unicode tricks, whitespace and control characters.
    "http://%6c%6fcalhost/",
    "http://127.0.0.%31/",
    "http://ｌｏｃａｌｈｏｓｔ/",
    "http://127。0。0。1/",
    "http://①②⑦.0.0.1/",
    "http://xn--/",
    "http://public.example\t/",
    "http://public.example /",
    "http://127.0.0.1 @public.example/",
    "http://public.example\r\nHost: 127.0.0.1/",
    # Other schemes, and URLs with no (or an odd) host or port.
    "ftp://public.example/",
    "file:///etc/passwd",
    "gopher://public.example/",
    "dict://public.example:11211/",
    "//public.example/",
    "http:/public.example/",
    "http:///x",
    "http://public.example:/",
    "http://public.example:0/",
    "http://public.example:99999/",
    "http://public.example:+80/",
    "http://-public.example/",
    "http://pub_lic.example/",
    # Public address, port not allowed.
    "http://public.example:25/",
    "http://public.example:6379/",
    f"https://{PUBLIC_IP}:8443/",
]


@pytest.mark.parametrize("url", NON_PUBLIC)
def test_every_spelling_of_a_non_public_or_ambiguous_url_is_refused(url: str) -> None:
    assert non_public_reason(url) is not None
    with pytest.raises(RefusedURL):
        destination(url)


@pytest.mark.parametrize(
    ("url", "host", "port", "target"),
    [
        ("http://public.example/cb", "public.example", 80, "/cb"),
        ("HTTPS://Public.Example/cb?x=1#frag", "public.example", 443, "/cb?x=1"),
        (f"https://{PUBLIC_IP}:443", PUBLIC_IP, 443, "/"),
        ("http://[2606:4700:4700::1111]/x", "2606:4700:4700::1111", 80, "/x"),
    ],
)
def test_public_urls_on_allowed_ports_are_accepted(url: str, host: str, port: int, target: str) -> None:
    assert non_public_reason(url) is None
    found = destination(url)
    assert (found.host, found.port, found.target) == (host, port, target)


def test_allowed_ports_are_a_setting() -> None:
    assert non_public_reason("http://public.example:8080/") is not None
    assert non_public_reason("http://public.example:8080/", ports="8080") is None
    assert non_public_reason("http://public.example/", ports="8080") is not None
    with pytest.raises(ValueError):
        netguard.parse_ports("80,http")


def test_allowing_private_addresses_keeps_the_parsing_rules() -> None:
    assert non_public_reason("http://127.0.0.1:5000/cb", allow_private=True) is None
    assert non_public_reason("http://private.example:9999/cb", allow_private=True) is None
    for url in ("http://127.0.0.1:5000\\@public.example/", "http://u@127.0.0.1:5000/", "http://2130706433:5000/"):
        assert non_public_reason(url, allow_private=True) is not None, url


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


def test_the_sender_connects_to_the_checked_address_not_a_new_resolution(receiver: Receiver) -> None:
    # DNS rebinding: the name is checked while it points at the receiver, then re-pointed. The sender must not ask
    # again; it connects to the address checked and sends the name as Host.
    FAKE_DNS["rebind.example"] = ["127.0.0.1"]
    try:
        target = destination(f"http://rebind.example:{receiver.port}/hook", allow_private=True)
        FAKE_DNS["rebind.example"] = ["10.255.255.1"]
        assert post(target, b"{}", {"Content-Type": "application/json"}, deadline_s=5.0) == 204
    finally:
        del FAKE_DNS["rebind.example"]
    assert [headers["Host"] for headers, _ in receiver.requests] == [f"rebind.example:{receiver.port}"]


class TlsReceiver:
    """An HTTPS receiver on loopback presenting a certificate for `host`; records each request's Host header and
    the TLS server name the client asked for."""

    def __init__(self, certificate: Path, key: Path) -> None:
        self.hosts: list[str] = []
        self.server_names: list[str | None] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                receiver.hosts.append(self.headers["Host"])
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certificate, key)
        context.sni_callback = lambda sock, name, ctx: receiver.server_names.append(name)  # type: ignore[assignment]
        self.port = free_port()
        self.server = HTTPServer(("127.0.0.1", self.port), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook_certificate(tmp_path: Path) -> Iterator[tuple[Path, TlsReceiver]]:
    certificate, key = self_signed_certificate(tmp_path, "hook.example")
    receiver = TlsReceiver(certificate, key)
    FAKE_DNS["hook.example"] = ["127.0.0.1"]
    yield certificate, receiver
    del FAKE_DNS["hook.example"]
    receiver.close()


def test_https_goes_to_the_checked_address_and_verifies_the_urls_host(
    hook_certificate: tuple[Path, TlsReceiver],
) -> None:
    certificate, receiver = hook_certificate
    target = destination(f"https://hook.example:{receiver.port}/hook", allow_private=True)
    FAKE_DNS["hook.example"] = ["10.255.255.1"]  # re-pointed after the check: must not matter
    assert post(target, b"{}", {"Content-Type": "application/json"}, deadline_s=5.0, ca_file=certificate) == 204
    assert receiver.hosts == [f"hook.example:{receiver.port}"]
    assert receiver.server_names == ["hook.example"]


def test_https_refuses_a_certificate_not_signed_by_a_trusted_ca(hook_certificate: tuple[Path, TlsReceiver]) -> None:
    _, receiver = hook_certificate
    target = destination(f"https://hook.example:{receiver.port}/hook", allow_private=True)
    with pytest.raises(ssl.SSLCertVerificationError, match="(?i)certificate"):
        post(target, b"{}", {}, deadline_s=5.0)  # certifi's bundle: the self-signed certificate is not in it
    assert receiver.hosts == []


def test_https_refuses_a_certificate_for_another_host(
    hook_certificate: tuple[Path, TlsReceiver], tmp_path: Path
) -> None:
    certificate, receiver = hook_certificate
    FAKE_DNS["other.example"] = ["127.0.0.1"]
    try:
        target = destination(f"https://other.example:{receiver.port}/hook", allow_private=True)
        with pytest.raises(ssl.SSLCertVerificationError, match="(?i)hostname"):
            post(target, b"{}", {}, deadline_s=5.0, ca_file=certificate)
    finally:
        del FAKE_DNS["other.example"]
    assert receiver.hosts == []
