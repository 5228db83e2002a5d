"""API keys and the tenants they name. Only SHA-256 hashes of keys are kept, in memory and in the keys file."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shared.errors import ConfigError, Unavailable

if TYPE_CHECKING:
    from shared.config import Settings

log = logging.getLogger(__name__)

# The tenant of every request when no keys are configured (loopback-only, unauthenticated).
LOCAL_TENANT = "local"
TENANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MIN_KEY_CHARS = 16
KEY_PREFIX = "rq_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A new random key: 256 bits, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def check_tenant(tenant: str) -> str:
    if tenant == LOCAL_TENANT:
        # Its jobs and batches are those made while no keys were configured: no key may open them.
        raise ConfigError(f"tenant name {LOCAL_TENANT!r} is reserved for the API without keys")
    if not TENANT_PATTERN.fullmatch(tenant):
        raise ConfigError(f"tenant name {tenant!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return tenant


def parse_env_keys(raw: str) -> list[tuple[str, str]]:
    """`tenant:key,...` as (tenant, key hash) pairs; the keys themselves are not kept."""
    entries = []
    for item in raw.split(","):
        tenant, sep, key = item.strip().partition(":")
        if not sep or not key:
            raise ConfigError("expected `tenant:key,...`")
        if len(key) < MIN_KEY_CHARS:
            raise ConfigError(f"the key of tenant {tenant!r} is shorter than {MIN_KEY_CHARS} characters")
        entries.append((check_tenant(tenant), hash_key(key)))
    return entries


def read_keys_file(path: Path) -> list[tuple[str, str]]:
    """The `tenant sha256-hex` lines of a keys file (blank lines and `#` comments skipped)."""
    entries = []
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"RAGQ_API_KEYS_FILE cannot be read: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"RAGQ_API_KEYS_FILE {path} is not UTF-8 text: {exc}") from exc
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or not re.fullmatch(r"[0-9a-f]{64}", parts[1]):
            raise ConfigError(f"{path}:{number}: expected `tenant sha256-hex-of-key`")
        entries.append((check_tenant(parts[0]), parts[1]))
    return entries


def add_key(path: Path, tenant: str) -> str:
    """Create a key for `tenant`, append its hash to the keys file (created mode 0600); returns the key."""
    check_tenant(tenant)
    key = new_key()
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(descriptor, "a", encoding="utf-8") as keys_file:
        keys_file.write(f"{tenant} {hash_key(key)}\n")
    return key


_UNREAD = object()


@dataclass
class KeyRing:
    """The configured keys: from `RAGQ_API_KEYS` and the keys file, which is read again when it changes."""

    env_entries: list[tuple[str, str]]
    path: Path | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._file_entries: list[tuple[str, str]] = []
        # Why the keys file cannot be used now (None while it can): every request is refused meanwhile.
        self._broken: str | None = None
        # The file version last read: (mtime_ns, size, inode), None for a missing file, _UNREAD at first.
        self._seen: object = _UNREAD
        self._reload(strict=True)

    @property
    def enabled(self) -> bool:
        """Whether any key is configured (a keys file counts even while empty: keys may be added to it)."""
        return bool(self.env_entries) or self.path is not None

    def tenant_for(self, key: str) -> str | None:
        """The tenant whose key this is, or None. Compares with every entry in constant time, no early exit.
        Raises `Unavailable` while the keys file cannot be read: a revoked key must not keep working."""
        self._reload()
        broken = self._broken
        if broken is not None:
            raise Unavailable(f"the API keys file cannot be read, so no request is accepted: {broken}")
        digest = hash_key(key)
        found = None
        for tenant, expected in self.env_entries + self._file_entries:
            if hmac.compare_digest(digest, expected):
                found = tenant
        return found

    def _reload(self, strict: bool = False) -> None:
        """Read the keys file again if it changed (each version once). At start-up a bad file is an error;
        later, a missing, unreadable or malformed file fails closed: no key is accepted (503) until it is
        fixed, because keeping the keys read before would keep a revoked key working. Logged once per version.
        Edit the file by writing a new one and renaming it over the old (`ragq keys create` appends one line)."""
        if self.path is None:
            return
        try:
            stat = self.path.stat()
            version: tuple[int, int, int] | None = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except OSError:
            version = None
        if version == self._seen:
            return
        with self._lock:
            self._seen = version
            try:
                if version is None:
                    raise ConfigError(f"RAGQ_API_KEYS_FILE {self.path} does not exist")
                self._file_entries = read_keys_file(self.path)
                self._broken = None
            except ConfigError as exc:
                if strict:
                    raise ConfigError(f"{exc.message}; create it with `ragq keys create TENANT`") from None
                self._file_entries = []
                self._broken = exc.message
                log.error("refusing every request until the API keys file is fixed: %s", exc.message)


def key_ring(settings: Settings) -> KeyRing:
    return KeyRing(parse_env_keys(settings.api_keys) if settings.api_keys else [], settings.api_keys_file)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    # A dual-stack socket shows an IPv4 peer as ::ffff:a.b.c.d, which Python 3.11 never calls loopback.
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def check_exposure(settings: Settings, ring: KeyRing) -> None:
    """Without keys, anyone who can reach the API could use it: allow that on loopback only (or a network the
    operator declares trusted). Requests are checked again per peer (`api.tenancy`), since gunicorn can be
    started with any bind."""
    if not ring.enabled and not settings.trust_network and not is_loopback(settings.host):
        raise ConfigError(
            f"no API keys are configured, so the API serves only on loopback and will not listen on {settings.host}; "
            "set RAGQ_API_KEYS_FILE (see `ragq keys create`) or RAGQ_API_KEYS, or RAGQ_TRUST_NETWORK=1 on a trusted network"
        )


UNAUTHENTICATED_NOTICE = "no API keys configured: serving without authentication, on loopback only (see `ragq keys create`)"


# Admin tenants (docs/design.md "Metrics"): a role of a tenant, so every key of it carries it, and the keys file
# keeps the format `ragq keys create` writes.
def parse_admin_tenants(raw: str | None) -> list[str]:
    """`RAGQ_ADMIN_TENANTS` (`team-a,ops`) as tenant names, each checked like a keys file's."""
    return [check_tenant(name.strip()) for name in (raw or "").split(",") if name.strip()]


def is_admin(tenant: str, admin_tenants: str | None, keys_enabled: bool) -> bool:
    """Whether `tenant` may see every tenant's figures: one named in `RAGQ_ADMIN_TENANTS`, or, without keys, the
    one tenant there is (`local`: every figure is its own)."""
    if not keys_enabled:
        return tenant == LOCAL_TENANT
    return tenant in {name.strip() for name in (admin_tenants or "").split(",")}
