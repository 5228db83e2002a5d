"""Usage per tenant and model: jobs, prompt and completion tokens, generate seconds, by hour, by day and in total.

Guarantee: every job that succeeds is counted once, in the same Lua script that stores its result (the job
transition of `shared.store` counts it when the target is `succeeded`), so a worker dying between the
two, or a redelivered message, can neither lose nor double a job's usage. Bounded: an hour's hash expires
`RETENTION_S["hour"]` after its last write, a day's after `RETENTION_S["day"]`; the totals (the Prometheus
counters) are one hash per tenant; fields are `<figure>:<model>`, so a hash holds 4 fields per model.
Hours and days are UTC, by Redis's clock.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import redis

from shared import redis_keys
from shared.api_keys import LOCAL_TENANT

HOUR_S = 3600
DAY_S = 86400
STEP_S = {"hour": HOUR_S, "day": DAY_S}
# Eight days of hours (a week and a day, for week-on-week comparisons); 400 days of days (a year and a month).
RETENTION_S = {"hour": 8 * DAY_S, "day": 400 * DAY_S}
# Buckets one `/v1/usage` request may span: the retention, so a request cannot ask Redis for more than exists.
MAX_BUCKETS = {granularity: RETENTION_S[granularity] // STEP_S[granularity] for granularity in STEP_S}
FIGURES = ("jobs", "prompt_tokens", "completion_tokens", "generate_s")

_TEMPLATES = json.dumps(
    {
        "bucket": redis_keys.usage_bucket("{tenant}", "{granularity}", "{start}"),
        "total": redis_keys.usage_total("{tenant}"),
        "tenants": redis_keys.usage_tenants(),
        "local_tenant": LOCAL_TENANT,
        "step": STEP_S,
        "retention": RETENTION_S,
    }
)

# Lua for `shared.store`'s script library (needs its `now()`). A script adds each succeeded job's figures (its
# `usage` field, written by the same transition) to a running sum per tenant and model (`note_usage`), and
# writes the sums once at its end (`record_usage`): a microbatch's results stored together cost one set of
# writes per tenant and model, not one per job.
RECORD_USAGE_LUA = f"""
local USAGE = cjson.decode([==[{_TEMPLATES}]==])
local function usage_key(template, tenant, granularity, start)
  local k = string.gsub(USAGE[template], '{{tenant}}', tenant)
  if granularity then
    k = string.gsub(k, '{{granularity}}', granularity)
    k = string.gsub(k, '{{start}}', string.format('%d', start))
  end
  return k
end
-- Returns the jobs count after these: equal to `jobs` means the entry (and maybe the key) is new.
local function add_usage(k, sum)
  local jobs = redis.call('HINCRBY', k, 'jobs:' .. sum.model, sum.jobs)
  redis.call('HINCRBY', k, 'prompt_tokens:' .. sum.model, sum.prompt)
  redis.call('HINCRBY', k, 'completion_tokens:' .. sum.model, sum.completion)
  redis.call('HINCRBYFLOAT', k, 'generate_s:' .. sum.model, string.format('%.6f', sum.generate_s))
  return jobs
end
-- `raw_tenant`, `raw_model`, `raw_usage`: the job's fields as the transition leaves them (JSON, or nil), so the
-- job is not read again. `sums` is the script's table of running sums.
local function note_usage(sums, raw_tenant, raw_model, raw_usage)
  local usage = cjson.decode(raw_usage or '{{}}')
  local tenant = raw_tenant and cjson.decode(raw_tenant) or USAGE['local_tenant']
  local model = cjson.decode(raw_model or '"unknown"')
  local k = tenant .. '\0' .. model
  local sum = sums[k]
  if not sum then
    sum = {{tenant = tenant, model = model, jobs = 0, prompt = 0, completion = 0, generate_s = 0}}
    sums[k] = sum
  end
  sum.jobs = sum.jobs + 1
  sum.prompt = sum.prompt + (tonumber(usage['prompt_tokens']) or 0)
  sum.completion = sum.completion + (tonumber(usage['completion_tokens']) or 0)
  sum.generate_s = sum.generate_s + (tonumber(usage['generate_s']) or 0)
end
-- Adds the sums to each tenant's hour, day and total. A bucket's TTL is set when its first job of a model
-- arrives (a key lives its retention from then), and the tenant is listed once: one write each per bucket.
local function record_usage(sums)
  local t = nil
  for _, sum in pairs(sums) do
    t = t or now()
    if add_usage(usage_key('total', sum.tenant), sum) == sum.jobs then
      redis.call('SADD', USAGE['tenants'], sum.tenant)
    end
    for granularity, step in pairs(USAGE['step']) do
      local k = usage_key('bucket', sum.tenant, granularity, math.floor(t / step) * step)
      if add_usage(k, sum) == sum.jobs then
        redis.call('EXPIRE', k, USAGE['retention'][granularity])
      end
    end
  end
end
"""


def job_usage(prompt_tokens: int, completion_tokens: int, generation_ms: float, call_size: int) -> dict[str, float | int]:
    """A succeeded job's `usage` field: its tokens, and its share of the `generate` call that answered it (the
    call's time divided by the questions in it: what the job cost the device, not the call's whole time)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "generate_s": round(generation_ms / 1000 / max(1, call_size), 6),
    }


@dataclass
class UsageRow:
    """One tenant's usage of one model, in one hour or day (`start`), or in total (`start` None)."""

    tenant: str
    model: str
    start: int | None = None
    figures: dict[str, float] = field(default_factory=lambda: dict.fromkeys(FIGURES, 0))

    def add(self, other: UsageRow) -> None:
        for name in FIGURES:
            self.figures[name] += other.figures[name]


def bucket_count(granularity: str, start_s: float, end_s: float) -> int:
    """How many hours or days `bucket_starts` would list, without listing them (a range may be centuries)."""
    if end_s <= start_s:
        return 0
    step = STEP_S[granularity]
    return math.ceil(end_s / step) - math.floor(start_s / step)


def bucket_starts(granularity: str, start_s: float, end_s: float) -> list[int]:
    """The first seconds of the hours or days that overlap [start_s, end_s)."""
    if end_s <= start_s:
        return []
    step = STEP_S[granularity]
    return list(range(int(start_s // step) * step, math.ceil(end_s), step))


def _rows(tenant: str, start: int | None, fields: dict[str, str]) -> list[UsageRow]:
    rows: dict[str, UsageRow] = {}
    for name, value in fields.items():
        figure, _, model = name.partition(":")
        if figure in FIGURES:
            row = rows.setdefault(model, UsageRow(tenant, model, start))
            row.figures[figure] = float(value) if figure == "generate_s" else int(value)
    return [rows[model] for model in sorted(rows)]


class UsageStore:
    """Reads the usage `record_usage` keeps."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def tenants(self) -> list[str]:
        """Every tenant with usage recorded."""
        return sorted(self.redis.smembers(redis_keys.usage_tenants()))

    def buckets(self, granularity: str, start_s: float, end_s: float, tenants: Iterable[str]) -> list[UsageRow]:
        """The hours or days of [start_s, end_s) with usage, per tenant and model, oldest first; one round trip."""
        starts = bucket_starts(granularity, start_s, end_s)
        wanted = [(tenant, start) for tenant in tenants for start in starts]
        pipe = self.redis.pipeline(transaction=False)
        for tenant, start in wanted:
            pipe.hgetall(redis_keys.usage_bucket(tenant, granularity, start))
        rows = [row for (tenant, start), fields in zip(wanted, pipe.execute(), strict=True) for row in _rows(tenant, start, fields)]
        return sorted(rows, key=lambda r: (r.start or 0, r.tenant, r.model))

    def totals(self, tenants: Iterable[str] | None = None) -> list[UsageRow]:
        """Usage since the data began, per tenant and model (every tenant's when `tenants` is None)."""
        names = self.tenants() if tenants is None else list(tenants)
        pipe = self.redis.pipeline(transaction=False)
        for tenant in names:
            pipe.hgetall(redis_keys.usage_total(tenant))
        return [row for tenant, fields in zip(names, pipe.execute(), strict=True) for row in _rows(tenant, None, fields)]


def summed(rows: Iterable[UsageRow]) -> list[UsageRow]:
    """`rows` added up per tenant and model (a range's totals)."""
    sums: dict[tuple[str, str], UsageRow] = {}
    for row in rows:
        sums.setdefault((row.tenant, row.model), UsageRow(row.tenant, row.model)).add(row)
    return [sums[key] for key in sorted(sums)]
