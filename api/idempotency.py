"""`Idempotency-Key`: a repeated POST within 24 hours returns the object the first one created."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from flask import request

from api import state, tenancy
from shared import redis_keys
from shared.batch_store import STAGING_TTL_S, IdempotencyClaim
from shared.errors import Conflict, NotFound, ValidationFailed

HEADER = "Idempotency-Key"
TTL_S = 24 * 3600
MAX_KEY_CHARS = 255
IN_PROGRESS = "a request with this Idempotency-Key is still being processed; retry shortly"

# KEYS[1] the key; ARGV[1] the entry this request wrote. Deletes the key only while it still holds that entry.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def fingerprint_start() -> hashlib._Hash:
    """A running fingerprint of this request for a body read as a stream: feed it the body, then `hexdigest()`.

    Like `fingerprint` (method, path, query, then the body), except the body's length is not hashed first.
    """
    digest = hashlib.sha256(b"stream\0")
    for part in (request.method.encode(), request.path.encode(), request.query_string):
        digest.update(len(part).to_bytes(8, "big") + part)
    return digest


def fingerprint(body: bytes) -> str:
    """What makes two requests the same: method, path, query and body."""
    digest = hashlib.sha256()
    for part in (request.method.encode(), request.path.encode(), request.query_string, body):
        digest.update(len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()


def _redis_key(kind: str) -> str | None:
    key = request.headers.get(HEADER)
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_KEY_CHARS:
        raise ValidationFailed(f"{HEADER} must be 1 to {MAX_KEY_CHARS} characters")
    # Scoped by tenant: two tenants choosing the same key never see each other's objects.
    scoped = f"{tenancy.tenant()}\0{key}"
    return redis_keys.idempotency(kind, hashlib.sha256(scoped.encode()).hexdigest())


def replayed_id(kind: str, request_fingerprint: str) -> str | None:
    """The id of the object an earlier request with this key created, or None for a first request."""
    redis_key = _redis_key(kind)
    if redis_key is None:
        return None
    raw = state.get().store.redis.get(redis_key)
    if raw is None:
        return None
    return _check(json.loads(raw), request_fingerprint)


def _check(entry: dict[str, str], request_fingerprint: str) -> str:
    if entry.get("pending"):
        raise Conflict(IN_PROGRESS, details={"type": "idempotency_key_in_progress"})
    if entry["fingerprint"] != request_fingerprint:
        raise Conflict(f"{HEADER} was already used for a different request", details={"type": "idempotency_key_reused"})
    return entry["id"]


@contextmanager
def reserve(kind: str, object_id: str, request_fingerprint: str, replay: Callable[[str], object]) -> Iterator[None]:
    """Claim the key for `object_id` while the object is created; release it if creation fails.

    A concurrent request with the same key that claimed it first wins: `replay` is raised through
    `Replay` with its object instead.
    """
    redis_key = _redis_key(kind)
    if redis_key is None:
        yield
        return
    client = state.get().store.redis
    entry = {"id": object_id, "fingerprint": request_fingerprint}
    if not client.set(redis_key, json.dumps(entry), nx=True, ex=TTL_S):
        winner = _check(json.loads(client.get(redis_key) or json.dumps(entry)), request_fingerprint)
        try:
            raise Replay(replay(winner))
        except NotFound:
            raise Conflict(IN_PROGRESS, details={"type": "idempotency_key_in_progress"}) from None
    try:
        yield
    except BaseException:
        client.delete(redis_key)
        raise


class Replay(Exception):
    """A concurrent request with the same key created the object first; carries that object."""

    def __init__(self, obj: object) -> None:
        super().__init__("replay")
        self.obj = obj


@contextmanager
def claim_pending(
    kind: str, object_id: str, request_fingerprint: Callable[[], str], replay: Callable[[str], object]
) -> Iterator[IdempotencyClaim | None]:
    """Claim the key as pending for `object_id` before any work, for a creation that makes its object and swaps in
    the final entry (`final_entry`) in the same step; the claim is released if the work fails.

    An earlier request with the key still pending: 409 `in progress`. One that finished: `Replay` with the
    object `replay` reads, if `request_fingerprint()` (called only then: it may read the body) matches. A claim
    whose process died expires with its staged work (`STAGING_TTL_S`): the key never names an object that was
    never made.
    """
    redis_key = _redis_key(kind)
    if redis_key is None:
        yield None
        return
    client = state.get().store.redis
    pending = json.dumps({"id": object_id, "pending": True})
    if not client.set(redis_key, pending, nx=True, ex=STAGING_TTL_S):
        raw = client.get(redis_key)
        entry = json.loads(raw) if raw is not None else {"pending": True}
        if entry.get("pending"):
            raise Conflict(IN_PROGRESS, details={"type": "idempotency_key_in_progress"})
        raise Replay(replay(_check(entry, request_fingerprint())))
    try:
        yield IdempotencyClaim(redis_key, pending, "", TTL_S)
    except BaseException:
        # The claim expires by itself if Redis is down too; the original error is the one to report.
        with contextlib.suppress(Exception):
            client.eval(_RELEASE_LUA, 1, redis_key, pending)
        raise


def final_entry(object_id: str, request_fingerprint: str) -> str:
    """What the key holds once the object exists: its id and the request that made it."""
    return json.dumps({"id": object_id, "fingerprint": request_fingerprint})
