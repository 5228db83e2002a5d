"""Background duties of a worker process: feed batch items, expire batches, deliver batch callbacks.

Each runs on its own daemon thread and only talks to Redis and HTTP, never to the model, so none of it
blocks a batch. Several workers may run them at once: every step is an atomic Redis operation.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time

import requests
from celery import Celery

from shared import redis_keys
from shared.lua import with_now
from shared.batch_store import BatchStore
from shared.broker import SENT_HEADER, enqueue, enqueue_many
from shared.errors import NotFound
from shared.jobs import Job, JobStatus
from shared.netguard import non_public_reason

log = logging.getLogger(__name__)

FEED_IDLE_S = 0.2
SWEEP_EVERY_S = 1.0
CALLBACK_TIMEOUT_S = 10.0
CALLBACK_MAX_ATTEMPTS = 8
CALLBACK_LEASE_S = 60.0
SIGNATURE_HEADER = "X-Ragq-Signature"

# Claims due callbacks: pushes each one's next due time out by the lease, so another worker does not
# send it at the same time. ARGV: now, lease seconds, max count.
_CLAIM_CALLBACKS_LUA = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(due) do redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), id) end
return due
"""


# A message sent this long ago whose job is still waiting for it is checked for; the message audit runs
# this often. Far above the milliseconds between a worker receiving a message and claiming its job.
MESSAGE_STALE_S = 60.0
AUDIT_EVERY_S = 10.0
AUDIT_LIMIT = 1000
AUDIT_SLACK_S = 5.0

# The message audit. Finds the jobs of one model whose message was sent over MESSAGE_STALE_S ago and that
# still wait for it (queued, or running under a worker that died or lost the job), and returns those whose
# message is gone:
#  - delivered to a consumer that never claimed the job: its connection died (a Redis restart) and Kombu
#    would give the message back only after the visibility timeout. The delivery is removed;
#  - or in no queue: taken from the list but never recorded as delivered (Kombu pops with BRPOP, then
#    records the delivery; a connection or process lost in between drops the message), or never sent.
#    Queues are FIFO lists, so a job's latest message has left its queue once the oldest message there was
#    sent after it (by the send time each message carries in its SENT_HEADER, plus a slack for senders
#    racing between noting and pushing); this reads one list item, never the whole queue.
# A false alarm sends a second message: the job runs once all the same, since a claim of a job running
# under a live worker is refused.
# KEYS: sent set, unacked hash, unacked index, interactive queue, batch queue.
# ARGV: job key template, worker alive template, stale seconds, limit, slack seconds, sent header name.
_AUDIT_LUA = with_now("""
local now = now()
local cutoff = now - tonumber(ARGV[3])
local slack = tonumber(ARGV[5])
local function message_of(payload)
  -- (job id, send time) of a queued message or of an unacked entry ([message, exchange, routing key]).
  local ok, message = pcall(cjson.decode, payload)
  if not ok or type(message) ~= 'table' then return nil, nil end
  if message[1] ~= nil then message = message[1] end
  local headers = type(message.headers) == 'table' and message.headers or {}
  local id = type(headers.argsrepr) == 'string' and string.match(headers.argsrepr, "'([^']+)'") or nil
  return id, tonumber(headers[ARGV[6]])
end
local candidates = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', cutoff, 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[4]))
if #candidates == 0 then return {} end
local delivered = {}
local unacked = redis.call('HGETALL', KEYS[2])
for i = 1, #unacked, 2 do
  local id = message_of(unacked[i + 1])
  if id then delivered[id] = unacked[i] end
end
local lost = {}
local function found_lost(id)
  -- Scored as sent now, so an audit running in another worker does not send it a third time.
  redis.call('ZADD', KEYS[1], now, id)
  table.insert(lost, id)
end
for i = 1, #candidates, 2 do
  local id, sent_at = candidates[i], tonumber(candidates[i + 1])
  local job = string.gsub(ARGV[1], '{id}', id)
  local fields = redis.call('HMGET', job, 'status', 'worker', 'batch_id')
  local waiting = fields[1] == 'queued'
  if fields[1] == 'running' then
    local worker = cjson.decode(fields[2] or 'null')
    waiting = worker == cjson.null or redis.call('EXISTS', (string.gsub(ARGV[2], '{id}', worker))) == 0
  end
  if not waiting then
    redis.call('ZREM', KEYS[1], id)
  elseif delivered[id] then
    local tag = delivered[id]
    local at = tonumber(redis.call('ZSCORE', KEYS[3], tag) or '0')
    if at < cutoff then
      redis.call('HDEL', KEYS[2], tag)
      redis.call('ZREM', KEYS[3], tag)
      found_lost(id)
    end
  else
    local queue = KEYS[4]
    if fields[3] and cjson.decode(fields[3]) ~= cjson.null then queue = KEYS[5] end
    local oldest = redis.call('LINDEX', queue, -1)
    if not oldest then
      found_lost(id)
    else
      local first, first_sent = message_of(oldest)
      if first ~= id and first_sent and first_sent > sent_at + slack then found_lost(id) end
    end
  end
end
return lost
""")

# Gives up a live worker's claim on a job it no longer runs (see `requeue_overdue`), so the next claim is
# allowed. KEYS[1] job; ARGV[1] the worker (JSON, as stored).
_DISOWN_LUA = """
if redis.call('HGET', KEYS[1], 'status') == 'running' and redis.call('HGET', KEYS[1], 'worker') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'worker', 'null')
  return 1
end
return 0
"""

HEARTBEAT_TTL_S = 10
OVERDUE_MARGIN_S = 30
HEARTBEAT_EVERY_S = 2.0

# Takes over the job set of a worker whose heartbeat has expired. KEYS: alive key, job set, index;
# ARGV[1] worker name. Returns the job ids, or nothing while the worker is alive or another reaper was first.
_CLAIM_DEAD_WORKER_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {} end
local jobs = redis.call('SMEMBERS', KEYS[2])
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
return jobs
"""


def sign(secret: str, body: bytes) -> str:
    """The `X-Ragq-Signature` value: `sha256=` and the hex HMAC-SHA256 of the body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def retry_delay_s(attempts: int) -> float:
    """Backoff after `attempts` failed deliveries: 2, 4, 8, ... seconds, at most 5 minutes."""
    return float(min(300, 2**attempts))


class Housekeeper:
    """Feeds a model's batch queue from its active batches and keeps batches moving to their end."""

    def __init__(
        self,
        batches: BatchStore,
        celery: Celery,
        model_name: str,
        feed_depth: int,
        callback_secret: str | None,
        worker_name: str,
        max_attempts: int,
        task_time_limit_s: float = 600,
        callback_allow_private: bool = False,
    ) -> None:
        self.callback_allow_private = callback_allow_private
        self.task_time_limit_s = task_time_limit_s
        self.worker_name = worker_name
        self.max_attempts = max_attempts
        self.batches = batches
        self.redis = batches.redis
        self.celery = celery
        self.model_name = model_name
        self.feed_depth = feed_depth
        self.callback_secret = callback_secret
        self._stop = threading.Event()
        self._claim_callbacks = self.redis.register_script(_CLAIM_CALLBACKS_LUA)
        self._claim_dead_worker = self.redis.register_script(_CLAIM_DEAD_WORKER_LUA)
        self._audit = self.redis.register_script(_AUDIT_LUA)
        self._disown = self.redis.register_script(_DISOWN_LUA)
        self._threads = [
            threading.Thread(target=self._guarded, args=(self._feed_loop,), name="ragq-feeder", daemon=True),
            threading.Thread(target=self._guarded, args=(self._callback_loop,), name="ragq-callbacks", daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _guarded(self, loop: object) -> None:
        # Redis may be down for a while; the loops must outlive that.
        while not self._stop.is_set():
            try:
                loop()  # type: ignore[operator]
            except Exception:
                log.exception("housekeeping error; retrying")
                self._stop.wait(1.0)

    def heartbeat(self) -> None:
        """Say this worker process is alive; its running jobs are reclaimed once this stops."""
        self.redis.set(redis_keys.worker_alive(self.worker_name), "1", ex=HEARTBEAT_TTL_S)

    def _feed_loop(self) -> None:
        next_sweep = next_heartbeat = 0.0
        next_audit = time.monotonic() + AUDIT_EVERY_S
        while not self._stop.is_set():
            if time.monotonic() >= next_heartbeat:
                self.heartbeat()
                next_heartbeat = time.monotonic() + HEARTBEAT_EVERY_S
            fed = self.feed_once()
            if time.monotonic() >= next_sweep:
                self.batches.expire_due()
                self.reap_dead_workers()
                self.requeue_overdue()
                next_sweep = time.monotonic() + SWEEP_EVERY_S
            if time.monotonic() >= next_audit:
                self.audit_messages()
                next_audit = time.monotonic() + AUDIT_EVERY_S
            if not fed:
                self._stop.wait(FEED_IDLE_S)

    def feed_once(self) -> int:
        """Top the batch queue up to `feed_depth` messages, round-robin over active batches."""
        room = self.feed_depth - int(self.redis.llen(redis_keys.model_batch_queue(self.model_name)))
        if room <= 0:
            return 0
        job_ids = self.batches.take_pending(self.model_name, room)
        enqueue_many(self.celery, self.redis, job_ids, self.model_name, batch_item=True)
        return len(job_ids)

    def _send_again(self, job: Job) -> None:
        enqueue(self.celery, self.redis, job.id, job.model, batch_item=job.batch_id is not None)

    def reap_dead_workers(self) -> list[str]:
        """Run again the jobs of worker processes that died (no heartbeat): the ones they were running and the
        ones whose messages they had reserved; fail those that used all their attempts.

        Celery would redeliver their messages too, but only after the visibility timeout (an hour by
        default); a job whose result is already stored by then is skipped.
        """
        requeued = []
        for worker in self.redis.smembers(redis_keys.workers_with_jobs()):
            if worker == self.worker_name:
                continue
            job_ids = self._claim_dead_worker(
                keys=[redis_keys.worker_alive(worker), redis_keys.worker_jobs(worker), redis_keys.workers_with_jobs()], args=[worker]
            )
            for job_id in job_ids:
                try:
                    job = self.batches.jobs.get(job_id)
                except NotFound:
                    continue
                # Running under this worker, or under another dead one (a re-sent job this worker reserved).
                held = job.status is JobStatus.QUEUED or (
                    job.status is JobStatus.RUNNING
                    and (job.worker in (None, worker) or not self.redis.exists(redis_keys.worker_alive(job.worker)))
                )
                if not held:
                    continue
                if job.attempts >= self.max_attempts:
                    self.batches.jobs.transition(
                        job_id,
                        JobStatus.FAILED,
                        finished_at=time.time(),
                        error={"type": "worker_lost", "message": f"the worker running this job died {job.attempts} times; not retried"},
                    )
                    continue
                self._send_again(job)
                requeued.append(job_id)
            if job_ids:
                log.warning("worker %s stopped answering; re-queued %d of its jobs", worker, len(requeued))
        return requeued

    def requeue_overdue(self) -> list[str]:
        """Re-queue jobs still `running` well past the task time limit under a live worker.

        A task stops waiting at the time limit and fails its job, so such a job has lost its task (a backstop:
        no known path loses one since Celery no longer cancels tasks on a broker reconnect).
        """
        cutoff = time.time() - self.task_time_limit_s - OVERDUE_MARGIN_S
        requeued = []
        for worker in self.redis.smembers(redis_keys.workers_with_jobs()):
            for job_id in self.redis.smembers(redis_keys.worker_jobs(worker)):
                try:
                    job = self.batches.jobs.get(job_id)
                except NotFound:
                    self.redis.srem(redis_keys.worker_jobs(worker), job_id)
                    continue
                if job.status is JobStatus.RUNNING and job.worker == worker and (job.started_at or 0) < cutoff:
                    self.redis.srem(redis_keys.worker_jobs(worker), job_id)
                    # The live worker's claim stands in the way of the next one: give it up first.
                    if not self._disown(keys=[redis_keys.job(job_id)], args=[json.dumps(worker)]):
                        continue
                    self._send_again(job)
                    requeued.append(job_id)
        if requeued:
            log.warning("re-queued %d jobs running past the time limit without a task", len(requeued))
        return requeued

    def audit_messages(self, stale_s: float = MESSAGE_STALE_S, slack_s: float = AUDIT_SLACK_S) -> list[str]:
        """Send again the messages of this model's jobs that were lost on their way to a worker (see `_AUDIT_LUA`)."""
        lost = self._audit(
            keys=[
                redis_keys.sent(self.model_name),
                redis_keys.broker_unacked(),
                redis_keys.broker_unacked_index(),
                redis_keys.model_queue(self.model_name),
                redis_keys.model_batch_queue(self.model_name),
            ],
            args=[redis_keys.job("{id}"), redis_keys.worker_alive("{id}"), stale_s, AUDIT_LIMIT, slack_s, SENT_HEADER],
        )
        resent = []
        for job_id in lost:
            try:
                job = self.batches.jobs.get(job_id)
            except NotFound:
                continue
            self._send_again(job)
            resent.append(job_id)
        if resent:
            log.warning("sent again %d messages lost on their way to a worker", len(resent))
        return resent

    def _callback_loop(self) -> None:
        while not self._stop.is_set():
            due = self._claim_callbacks(keys=[redis_keys.callbacks()], args=[time.time(), CALLBACK_LEASE_S, 10])
            for batch_id in due:
                self.deliver(batch_id)
            if not due:
                self._stop.wait(0.5)

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
