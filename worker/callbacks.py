"""Delivers batch callbacks: the final batch object, signed, POSTed to the batch's `callback_url`.

Guarantees: every due callback (`ragq:callbacks`, scheduled when a batch ends) is attempted until it is
delivered (a 2xx answer) or has failed `CALLBACK_MAX_ATTEMPTS` times, with backoff between attempts
(`retry_delay_s`); one whose batch, URL or secret is gone, or whose URL is refused (below), is dropped. Each
body carries `X-Ragq-Signature`, an HMAC-SHA256 of the exact bytes sent, keyed with the callback secret. A
claimed callback is leased for `CALLBACK_LEASE_S`, so two workers do not send it at the same time (a worker
dying mid-send leaves it to be sent again after the lease: a receiver may see a duplicate, never a gap).
Nothing is sent to a non-public address unless `RAGQ_CALLBACK_ALLOW_PRIVATE=1` (checked again at sending: the
name may point somewhere else by now), and redirects are not followed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time

import requests

from shared import redis_keys
from shared.batch_store import BatchStore
from shared.errors import NotFound
from shared.netguard import non_public_reason

log = logging.getLogger(__name__)

CALLBACK_TIMEOUT_S = 10.0
CALLBACK_MAX_ATTEMPTS = 8
CALLBACK_LEASE_S = 60.0
SIGNATURE_HEADER = "X-Ragq-Signature"
# With nothing due, look again after this long; while callbacks are due, at once.
CALLBACK_IDLE_S = 0.5
# Callbacks claimed per round: one worker sends them one by one, so it leaves the rest to other workers.
CALLBACK_CLAIM_MAX = 10

# Claims due callbacks: pushes each one's next due time out by the lease, so another worker does not
# send it at the same time. ARGV: now, lease seconds, max count.
_CLAIM_CALLBACKS_LUA = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(due) do redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), id) end
return due
"""


def sign(secret: str, body: bytes) -> str:
    """The `X-Ragq-Signature` value: `sha256=` and the hex HMAC-SHA256 of the body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def retry_delay_s(attempts: int) -> float:
    """Backoff after `attempts` failed deliveries: 2, 4, 8, ... seconds, at most 5 minutes."""
    return float(min(300, 2**attempts))


class CallbackSender:
    """Claims due batch callbacks and delivers them."""

    thread_name = "ragq-callbacks"
    first_wait_s = 0.0

    def __init__(
        self,
        batches: BatchStore,
        callback_secret: str | None,
        callback_allow_private: bool = False,
        every_s: float = CALLBACK_IDLE_S,
    ) -> None:
        self.batches = batches
        self.redis = batches.redis
        self.callback_secret = callback_secret
        self.callback_allow_private = callback_allow_private
        self.every_s = every_s
        self._claim_callbacks = self.redis.register_script(_CLAIM_CALLBACKS_LUA)

    def step(self) -> bool:
        """Deliver the callbacks due now; True when some were due (more may be)."""
        due = self._claim_callbacks(
            keys=[redis_keys.callbacks()], args=[time.time(), CALLBACK_LEASE_S, CALLBACK_CLAIM_MAX]
        )
        for batch_id in due:
            self.deliver(batch_id)
        return bool(due)

    def deliver(self, batch_id: str) -> bool:
        """POST the final batch object to its callback URL, signed; reschedule with backoff on failure."""
        try:
            batch, counts = self.batches.get(batch_id)
        except NotFound:
            self._forget_callback(batch_id)
            return False
        if batch.callback_url is None or self.callback_secret is None:
            self._forget_callback(batch_id)
            return False
        # Checked again at sending: the name may point somewhere else by now.
        problem = None if self.callback_allow_private else non_public_reason(batch.callback_url)
        if problem:
            log.error("not sending the callback of batch %s: its URL %s", batch_id, problem)
            self._forget_callback(batch_id)
            return False
        body = json.dumps(batch.to_public(counts)).encode()
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(self.callback_secret, body)}
        try:
            # No redirects: a public URL must not bounce the request into a private network.
            response = requests.post(
                batch.callback_url, data=body, headers=headers, timeout=CALLBACK_TIMEOUT_S, allow_redirects=False
            )
            delivered = 200 <= response.status_code < 300
            problem = f"HTTP {response.status_code}"
        except requests.RequestException as exc:
            delivered, problem = False, type(exc).__name__
        if delivered:
            self._forget_callback(batch_id)
            return True
        attempts = int(self.redis.hincrby(redis_keys.callback_attempts(), batch_id, 1))
        if attempts >= CALLBACK_MAX_ATTEMPTS:
            log.error("giving up on the callback of batch %s after %d attempts (%s)", batch_id, attempts, problem)
            self._forget_callback(batch_id)
        else:
            self.redis.zadd(redis_keys.callbacks(), {batch_id: time.time() + retry_delay_s(attempts)})
        return False

    def _forget_callback(self, batch_id: str) -> None:
        self.redis.zrem(redis_keys.callbacks(), batch_id)
        self.redis.hdel(redis_keys.callback_attempts(), batch_id)
