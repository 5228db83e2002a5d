"""`REDIS_URL` forms: one Redis (`redis://`, `rediss://`, `unix://`) or a Sentinel-managed primary (`sentinel://`).

`sentinel://[[user]:password@]host1:26379,host2:26379,host3:26379[/db]` names the sentinels to ask; the
password in it is the Redis primary's (and its replicas'), as in Kombu's URLs. The master's name and the
sentinels' own password are settings (`RAGQ_SENTINEL_MASTER`, `RAGQ_SENTINEL_PASSWORD`), kept out of the URL
so that the URL stays one `host:port` list.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote

SENTINEL_SCHEME = "sentinel://"
PLAIN_SCHEMES = ("redis://", "rediss://", "unix://")
DEFAULT_SENTINEL_PORT = 26379
# Sentinels listed in one URL at most: a quorum needs three or five; more is a typo.
MAX_SENTINELS = 16
MAX_DB = 15


@dataclass(frozen=True)
class SentinelUrl:
    """A parsed `sentinel://` URL: where the sentinels are, and how to log in to the primary they name."""

    sentinels: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    db: int

    def kombu_url(self) -> str:
        """The same target as Kombu's sentinel transport wants it: one `sentinel://` URL per sentinel, `;`-joined."""
        userinfo = ""
        if self.username is not None or self.password is not None:
            userinfo = f"{quote(self.username or '', safe='')}:{quote(self.password or '', safe='')}@"
        return ";".join(f"sentinel://{userinfo}{_host_text(host)}:{port}/{self.db}" for host, port in self.sentinels)


def is_sentinel(url: str) -> bool:
    return url.startswith(SENTINEL_SCHEME)


def check_redis_url(url: str) -> None:
    """Raise ValueError saying why `url` is not a `REDIS_URL` ragq can use."""
    if is_sentinel(url):
        parse_sentinel_url(url)
    elif not url.startswith(PLAIN_SCHEMES):
        raise ValueError("must start with redis://, rediss://, unix:// or sentinel://")


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Parse `sentinel://[[user]:password@]host[:port],host[:port].../db`; ValueError (never echoing the password)."""
    if not is_sentinel(url):
        raise ValueError("must start with sentinel://")
    rest = url[len(SENTINEL_SCHEME) :]
    if "?" in rest or "#" in rest:
        raise ValueError("sentinel:// URLs take no query or fragment; use the RAGQ_SENTINEL_* settings")
    userinfo, _, hosts_and_db = rest.rpartition("@")
    username = password = None
    if userinfo:
        name, colon, secret = userinfo.partition(":")
        username = unquote(name) or None
        password = unquote(secret) if colon else None
        if not colon:
            raise ValueError("the part before @ must be `:password` or `user:password`")
    hosts, _, db_text = hosts_and_db.partition("/")
    db = 0
    if db_text:
        if not db_text.isdigit() or int(db_text) > MAX_DB:
            raise ValueError(f"the database after / must be a number 0..{MAX_DB}")
        db = int(db_text)
    sentinels = tuple(_host_port(item) for item in hosts.split(","))
    if len(sentinels) > MAX_SENTINELS:
        raise ValueError(f"more than {MAX_SENTINELS} sentinels")
    return SentinelUrl(sentinels, username, password, db)


def _host_port(item: str) -> tuple[str, int]:
    item = item.strip()
    if not item:
        raise ValueError("names an empty sentinel address (two commas, or none before /)")
    if item.startswith("["):  # [::1]:26379
        host, _, port_text = item[1:].partition("]")
        port_text = port_text.removeprefix(":")
    else:
        host, _, port_text = item.rpartition(":") if ":" in item else (item, "", "")
    if not host:
        raise ValueError(f"sentinel address {item!r} has no host")
    if port_text and not (port_text.isdigit() and 1 <= int(port_text) <= 65535):
        raise ValueError(f"sentinel address {item!r} has no valid port")
    return host, int(port_text) if port_text else DEFAULT_SENTINEL_PORT


def _host_text(host: str) -> str:
    return f"[{host}]" if ":" in host else host
