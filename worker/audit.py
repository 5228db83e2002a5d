"""The message audit: finds the messages of this model's jobs that were lost on their way to a worker, and sends
them again.

Guarantees: a job of this model whose message was sent (`shared.broker.enqueue` notes every send in
`ragq:sent:<model>` with Redis's clock; batch items get no message until one is sent again) and that still
waits for it `MESSAGE_STALE_S` later (queued, or running under a dead worker or none) gets a new message, every
`AUDIT_EVERY_S`, in every worker of the model: whether its message was dropped between Kombu's `BRPOP` and its
`unacked` record, delivered to a consumer whose connection died, or never sent because its sender died. A false
alarm only sends a second message, which the job state machine makes harmless. One Lua script decides (see
`_AUDIT_LUA`); it reads at most `AUDIT_LIMIT` candidates and one item of each queue, never a whole queue.
"""

from __future__ import annotations

import logging

from celery import Celery

from shared import redis_keys
from shared.broker import SENT_HEADER, send_again
from shared.errors import NotFound
from shared.lua import with_now
from shared.store import JobStore

log = logging.getLogger(__name__)

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
# Returns {the time the lost jobs were noted as sent again (Redis's clock), their ids}.
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
if #candidates == 0 then return {tostring(now), {}} end
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
return {tostring(now), lost}
""")


class MessageAudit:
    """Sends again the messages of one model's jobs that were lost on their way to a worker."""

    thread_name = "ragq-audit"

    def __init__(self, store: JobStore, celery: Celery, model_name: str, every_s: float = AUDIT_EVERY_S) -> None:
        self.store = store
        self.redis = store.redis
        self.celery = celery
        self.model_name = model_name
        self.every_s = every_s
        # The first round comes one interval after start, like every later one.
        self.first_wait_s = every_s
        self._audit = self.redis.register_script(_AUDIT_LUA)

    def step(self) -> bool:
        """Audit once; never asks to run again at once."""
        self.audit_messages()
        return False

    def audit_messages(self, stale_s: float = MESSAGE_STALE_S, slack_s: float = AUDIT_SLACK_S) -> list[str]:
        """Send again the messages of this model's jobs that were lost on their way to a worker (see `_AUDIT_LUA`)."""
        sent_at, lost = self._audit(
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
                job = self.store.get(job_id)
            except NotFound:
                continue
            send_again(self.celery, self.redis, job, sent_at=str(sent_at))
            resent.append(job_id)
        if resent:
            log.warning("sent again %d messages lost on their way to a worker", len(resent))
        return resent
