"""The one factory of Redis clients (job store, API long-polls, workers' scripts, `ragq serve`'s checks), for one
Redis or a Sentinel-managed primary, and the replica barrier that makes an accepted submission survive a failover.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from shared import redis_keys
from shared.errors import Unavailable
from shared.redis_url import is_sentinel, parse_sentinel_url

DEFAULT_SENTINEL_MASTER = "mymaster"
# A sentinel that does not answer within this is skipped for the next one in the URL.
SENTINEL_SOCKET_TIMEOUT_S = 1.0
# With Sentinel, a command that finds its connection broken (the primary died, or was demoted: READONLY) is sent
# again on a new connection to whatever primary the sentinels name then: 0.25 + 0.5 + 1 + 1 + 1 s of backoff covers
# a failover with a small `down-after-milliseconds`; past it the caller sees ConnectionError (the API: 503).
# Only connection errors: after a timeout the command may have run, and a second run of a script is not a no-op.
FAILOVER_RETRY = Retry(ExponentialBackoff(cap=1.0, base=0.25), retries=5, supported_errors=(ConnectionError,))


class BlockingSentinelConnectionPool(SentinelConnectionPool, redis.BlockingConnectionPool):
    """Sentinel's pool (asks the sentinels for the primary on every new connection, drops connections to a demoted
    one) with the bounds of a blocking pool: past `max_connections` a caller waits `timeout` for a free connection
    instead of failing. The MRO puts Sentinel's connection handling over BlockingConnectionPool's queue."""


def sentinel_kwargs(password: str | None) -> dict[str, Any]:
    """How to talk to the sentinels themselves (redis-py and Kombu both take this dict)."""
    # Given explicitly, redis-py uses this dict alone for the sentinels: without timeouts a dead sentinel would hang.
    kwargs: dict[str, Any] = {"socket_timeout": SENTINEL_SOCKET_TIMEOUT_S, "socket_connect_timeout": SENTINEL_SOCKET_TIMEOUT_S}
    if password is not None:
        kwargs["password"] = password
    return kwargs


def connect(
    url: str, threads: int = 8, *, sentinel_master: str = DEFAULT_SENTINEL_MASTER, sentinel_password: str | None = None
) -> redis.Redis:
    """A Redis client for `threads` concurrent users that fails fast when Redis is down (so the API answers 503).

    Each long-poll holds a pub/sub connection while it waits and needs another to read the job, so the pool
    allows two per thread; past that, a request waits briefly for a free connection instead of failing.
    With a `sentinel://` URL the client follows the primary named `sentinel_master` across failovers: a
    connection to a primary that died or was demoted (`READONLY`) is dropped, and the next one asks the sentinels
    again (redis-py retries a failed command on a new connection, three times with backoff).
    """
    options: dict[str, Any] = {
        "max_connections": 2 * threads + 8,
        "timeout": 10,
        "decode_responses": True,
        "socket_connect_timeout": 3,
        "socket_timeout": 10,
        "health_check_interval": 30,
    }
    if not is_sentinel(url):
        return redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(url, **options))
    target = parse_sentinel_url(url)
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_kwargs(sentinel_password))
    client: redis.Redis = sentinel.master_for(
        sentinel_master,
        connection_pool_class=BlockingSentinelConnectionPool,
        username=target.username,
        password=target.password,
        db=target.db,
        retry=FAILOVER_RETRY,
        **options,
    )
    return client


def wait_for_replicas(client: redis.Redis, replicas: int, timeout_ms: int) -> None:
    """Return once `replicas` replicas hold every write made so far (Unavailable after `timeout_ms`); 0: at once.

    WAIT covers the writes of the connection it runs on, and a submission's writes went over several (the pool's,
    Kombu's). A PUBLISH just before it on the same connection is a write replicated after all of them, so the
    WAIT covers them all: Redis applies commands one at a time, and replicas receive them in that order.
    """
    if replicas <= 0:
        return
    pipe = client.pipeline(transaction=False)
    pipe.publish(redis_keys.replication_barrier(), "")
    pipe.wait(replicas, timeout_ms)
    acked = int(pipe.execute()[1])
    if acked < replicas:
        raise Unavailable(
            f"the job store's replicas did not confirm the write within {timeout_ms} ms; it may still run, retry with the same Idempotency-Key",
            details={"reason": "replicas_not_acked", "replicas_acked": acked, "replicas_required": replicas},
        )
