"""Who is calling (the tenant named by `Authorization: Bearer <key>`) and how much it may ask for.

With no keys configured, every caller is the one tenant `local`: the API refuses to listen beyond loopback
(`check_exposure`), and, however it was started (`gunicorn -b 0.0.0.0:8000 'api:create_app()'` too), answers
only loopback peers that name it by a loopback `Host` (`guard_keyless`), unless `RAGQ_TRUST_NETWORK=1`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

import redis
from flask import Flask, g, request

from api import state
from shared import redis_keys
from shared.config import Settings
from shared.errors import Forbidden, TooManyRequests, Unauthorized
from shared.api_keys import LOCAL_TENANT, KeyRing, check_exposure, is_loopback, key_ring

# A client over its outstanding-jobs quota waits for some of its jobs to finish.
QUOTA_RETRY_AFTER_S = 30


def init_app(app: Flask, settings: Settings) -> None:
    ring = key_ring(settings)
    check_exposure(settings, ring)
    app.extensions["ragq-keys"] = ring  # read by api.server for its start-up notice

    allowed_hosts = LOOPBACK_HOSTS | {name.strip().lower() for name in (settings.allowed_hosts or "").split(",") if name.strip()}

    @app.before_request
    def identify() -> None:
        # Health checks and the OpenAPI document stay open; everything under /v1 needs a tenant.
        if request.path == "/v1" or request.path.startswith("/v1/"):
            if not ring.enabled:
                guard_keyless(settings.trust_network, allowed_hosts)
            g.tenant = authenticate(ring)
            limit_rate(g.tenant)


# `Host` names a keyless API answers to (any port), besides RAGQ_ALLOWED_HOSTS.
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})
# Headers by which a proxy says it relays someone else's request.
FORWARDING_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")


def guard_keyless(trust_network: bool, allowed_hosts: frozenset[str] | set[str]) -> None:
    """Without keys, serve only the local machine: a loopback peer, not relaying anyone (no proxy headers are
    believed: they would let anyone claim loopback), calling the API by a loopback or allowed name."""
    if not trust_network:
        peer = request.remote_addr or ""
        # An empty peer is a Unix socket (gunicorn -b unix:PATH): a process on this machine.
        if peer and not is_loopback(peer):
            raise Forbidden(
                "this API has no keys configured and serves only the local machine; "
                "configure API keys (RAGQ_API_KEYS_FILE) or set RAGQ_TRUST_NETWORK=1",
                details={"peer": peer},
            )
        relayed = [name for name in FORWARDING_HEADERS if name in request.headers]
        if relayed:
            raise Forbidden(
                "this API has no keys configured and does not serve requests relayed by a proxy; configure API keys",
                details={"headers": relayed},
            )
    # DNS rebinding: a web page's own host name resolved to 127.0.0.1 still sends that name as Host.
    host = request.host.lower()
    name = host.rpartition(":")[0] if host.rpartition(":")[2].isdigit() else host
    if name not in allowed_hosts:
        raise Forbidden(
            f"Host {name!r} is not one this API answers to without keys; add it to RAGQ_ALLOWED_HOSTS",
            details={"host": name},
        )


def authenticate(ring: KeyRing) -> str:
    if not ring.enabled:
        return LOCAL_TENANT
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("an API key is required: send `Authorization: Bearer <key>`")
    tenant = ring.tenant_for(key.strip())
    if tenant is None:
        raise Unauthorized("the API key is not valid")
    return tenant


def limit_rate(tenant: str) -> None:
    """At most `RAGQ_RATE_LIMIT_PER_MIN` requests per tenant per calendar minute (one counter in Redis)."""
    api = state.get()
    now = time.time()
    counter = redis_keys.tenant_rate(tenant, int(now // 60))
    pipe = api.store.redis.pipeline(transaction=False)
    pipe.incr(counter)
    pipe.expire(counter, 120)
    try:
        count, _ = pipe.execute()
    except redis.RedisError:
        # Redis down or full: whatever this request needs from Redis fails with 503 in its turn, after
        # a malformed request has had its 4xx. Nothing can be overused meanwhile.
        return
    limit = api.settings.rate_limit_per_min
    if count > limit:
        raise TooManyRequests(
            f"more than {limit} requests in this minute", retry_after_s=math.ceil(60 - now % 60), details={"limit_per_min": limit}
        )


def tenant() -> str:
    """The tenant of the current request."""
    return str(g.tenant)


class Reservation:
    """Jobs counted against the tenant's quota for a request; given back if the request fails, unless kept."""

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self.kept = False

    def keep(self) -> None:
        """The jobs exist after all (a failed undo): their final transitions will give the places back."""
        self.kept = True


@contextmanager
def outstanding(jobs: int) -> Iterator[Reservation]:
    """Count `jobs` new jobs against the tenant's quota (429 if they do not fit); give them back if creating fails."""
    api = state.get()
    cap = api.settings.max_outstanding_jobs
    if not api.store.reserve(tenant(), jobs, cap):
        raise TooManyRequests(
            f"this would take your queued and running jobs over the limit of {cap}; wait for some to finish",
            retry_after_s=QUOTA_RETRY_AFTER_S,
            details={"max_outstanding_jobs": cap, "requested": jobs},
        )
    reservation = Reservation(jobs)
    try:
        yield reservation
    except BaseException:
        if not reservation.kept:
            api.store.release(tenant(), jobs)
        raise
