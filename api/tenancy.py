"""Who is calling (the tenant named by `Authorization: Bearer <key>`) and how much it may ask for.

With no keys configured, every caller is the one tenant `local` and the API refuses to listen beyond
loopback (`check_exposure`).
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
from shared.errors import TooManyRequests, Unauthorized
from shared.api_keys import LOCAL_TENANT, KeyRing, check_exposure, key_ring

# A client over its outstanding-jobs quota waits for some of its jobs to finish.
QUOTA_RETRY_AFTER_S = 30


def init_app(app: Flask, settings: Settings) -> None:
    ring = key_ring(settings)
    check_exposure(settings, ring)
    app.extensions["ragq-keys"] = ring  # read by api.server for its start-up notice

    @app.before_request
    def identify() -> None:
        # Health checks and the OpenAPI document stay open; everything under /v1 needs a tenant.
        if request.path == "/v1" or request.path.startswith("/v1/"):
            g.tenant = authenticate(ring)
            limit_rate(g.tenant)


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
