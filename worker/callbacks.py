"""Delivers batch callbacks: the final batch object, signed, POSTed to the batch's `callback_url`.

Guarantees: every due callback (`ragq:callbacks`, scheduled when a batch ends) is attempted until it is
delivered (a 2xx answer) or `CALLBACK_MAX_ATTEMPTS` attempts have been made, with backoff between attempts
(`retry_delay_s`); one whose batch, URL or secret is gone, or whose URL is refused (below), is dropped. An
attempt is counted in Redis before its request is sent, so a receiver that hangs or a worker that dies
mid-send still uses up attempts, and each attempt ends within `RAGQ_CALLBACK_DEADLINE_S` in all (connecting,
TLS, sending, and reading at most `RESPONSE_READ_MAX_BYTES` of the answer), however slowly the receiver
talks. Each body carries `Ragq-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "t.body">`, keyed with the
batch tenant's secret (`shared.callback_signing`). A claimed callback is leased for `CALLBACK_LEASE_S` (longer
than an attempt), so two workers do not send it at the same time (a worker dying mid-send leaves it to be sent
again after the lease: a receiver may see a duplicate, never a gap).
The URL is checked at sending by `shared.netguard` (public addresses and `RAGQ_CALLBACK_PORTS` only, unless
`RAGQ_CALLBACK_ALLOW_PRIVATE=1`), and the request goes to the very address that was checked, with the URL's host
as Host header and TLS server name; redirects are not followed. HTTPS receivers must present a certificate for the
URL's host signed by a CA in certifi's bundle, or in `RAGQ_CALLBACK_CA_FILE` (receivers behind an internal CA).
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import certifi

from shared import redis_keys
from shared.batch_store import BatchStore
from shared.callback_signing import SIGNATURE_HEADER, sign, tenant_secret
from shared.errors import NotFound
from shared.netguard import DEFAULT_PORTS, Destination, RefusedURL, destination, parse_ports
from worker import metrics as worker_metrics

log = logging.getLogger(__name__)

# One attempt, start to end, unless `RAGQ_CALLBACK_DEADLINE_S` says otherwise: a receiver sending a byte now and
# then cannot hold a worker thread longer.
CALLBACK_DEADLINE_S = 10.0
CALLBACK_MAX_ATTEMPTS = 8
CALLBACK_LEASE_S = 60.0
# Of the receiver's answer only the status matters; at most this much of its body is read, the rest dropped.
RESPONSE_READ_MAX_BYTES = 4096
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


def retry_delay_s(attempts: int) -> float:
    """Backoff after `attempts` failed deliveries: 2, 4, 8, ... seconds, at most 5 minutes."""
    return float(min(300, 2**attempts))


class _Watchdog:
    """Shuts a connection down when the attempt's deadline passes, whatever read or write is waiting on it."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.fired = False
        self._guard: socket.socket | None = None
        self._timer: threading.Timer | None = None

    def arm(self, sock: socket.socket) -> None:
        # A duplicate of the descriptor: shutting it down ends the connection even after TLS wraps `sock`.
        self._guard = sock.dup()
        self._timer = threading.Timer(max(0.0, self.deadline - time.monotonic()), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        try:
            if self._guard is not None:
                self._guard.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._guard is not None:
            self._guard.close()


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the checked address, not to whatever the host name resolves to now."""

    def __init__(self, target: Destination, timeout: float, on_connect: Callable[[socket.socket], None]) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self._target, self._on_connect = target, on_connect

    def connect(self) -> None:
        self.sock = socket.create_connection((self._target.address, self._target.port), self.timeout)
        self._on_connect(self.sock)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """As `_PinnedHTTPConnection`, over TLS whose certificate must name the URL's host."""

    def __init__(
        self,
        target: Destination,
        timeout: float,
        on_connect: Callable[[socket.socket], None],
        ca_file: Path | None = None,
    ) -> None:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else certifi.where())
        super().__init__(target.host, target.port, timeout=timeout, context=context)
        self._target, self._on_connect = target, on_connect

    def connect(self) -> None:
        sock = socket.create_connection((self._target.address, self._target.port), self.timeout)
        self._on_connect(sock)
        self.sock = self._context.wrap_socket(sock, server_hostname=self._target.host)  # type: ignore[attr-defined]


def post(
    target: Destination, body: bytes, headers: Mapping[str, str], deadline_s: float, ca_file: Path | None = None
) -> int:
    """POST `body` to `target` and return the answer's status, all within `deadline_s`; OSError or
    http.client.HTTPException when it fails or the deadline passes first. HTTPS trusts `ca_file`, else certifi."""
    watchdog = _Watchdog(time.monotonic() + deadline_s)
    connection: http.client.HTTPConnection
    if target.scheme == "https":
        connection = _PinnedHTTPSConnection(target, deadline_s, watchdog.arm, ca_file)
    else:
        connection = _PinnedHTTPConnection(target, deadline_s, watchdog.arm)
    try:
        connection.request("POST", target.target, body=body, headers={"Host": target.host_header, **headers})
        response = connection.getresponse()
        try:
            response.read(RESPONSE_READ_MAX_BYTES)
        except (OSError, http.client.HTTPException):
            pass  # the status is what counts
        return response.status
    except (OSError, http.client.HTTPException) as exc:
        if watchdog.fired:
            raise TimeoutError(f"no answer within the {deadline_s:g} s deadline") from exc
        raise
    finally:
        connection.close()
        watchdog.disarm()


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
        callback_ports: str = DEFAULT_PORTS,
        deadline_s: float = CALLBACK_DEADLINE_S,
        ca_file: Path | None = None,
    ) -> None:
        self.batches = batches
        self.redis = batches.redis
        self.callback_secret = callback_secret
        self.callback_allow_private = callback_allow_private
        self.callback_ports = parse_ports(callback_ports)
        self.deadline_s = deadline_s
        self.ca_file = ca_file
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
        # Checked again at sending (the name may point somewhere else by now), and sent to the address checked.
        try:
            target = destination(batch.callback_url, self.callback_ports, self.callback_allow_private)
        except RefusedURL as exc:
            log.error("not sending the callback of batch %s: its URL %s", batch_id, exc)
            self._forget_callback(batch_id)
            return False
        # Counted before sending: a receiver that hangs, or a worker that dies mid-send, uses up attempts too.
        attempts = int(self.redis.hincrby(redis_keys.callback_attempts(), batch_id, 1))
        if attempts > CALLBACK_MAX_ATTEMPTS:
            log.error("giving up on the callback of batch %s after %d attempts", batch_id, attempts - 1)
            self._forget_callback(batch_id)
            return False
        body = json.dumps(batch.to_public(counts)).encode()
        secret = tenant_secret(self.callback_secret, batch.tenant)
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(secret, body, int(time.time()))}
        problem: Any
        try:
            status = post(target, body, headers, self.deadline_s, self.ca_file)
            delivered, problem = 200 <= status < 300, f"HTTP {status}"
        except (OSError, http.client.HTTPException, ValueError) as exc:
            delivered, problem = False, f"{type(exc).__name__}: {exc}"
        worker_metrics.callback(delivered)
        if delivered:
            self._forget_callback(batch_id)
            return True
        if attempts >= CALLBACK_MAX_ATTEMPTS:
            log.error("giving up on the callback of batch %s after %d attempts (%s)", batch_id, attempts, problem)
            self._forget_callback(batch_id)
        else:
            log.warning("callback of batch %s failed (attempt %d: %s)", batch_id, attempts, problem)
            self.redis.zadd(redis_keys.callbacks(), {batch_id: time.time() + retry_delay_s(attempts)})
        return False

    def _forget_callback(self, batch_id: str) -> None:
        self.redis.zrem(redis_keys.callbacks(), batch_id)
        self.redis.hdel(redis_keys.callback_attempts(), batch_id)
