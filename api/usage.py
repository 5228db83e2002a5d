"""`GET /v1/usage`: jobs, tokens and generate seconds per tenant and model, by hour or day (shared/usage.py).

A tenant sees its own; a tenant named in RAGQ_ADMIN_TENANTS sees every tenant's; without keys the one tenant
`local` sees everything, which is its own.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, current_app, request

from api import state, tenancy
from shared.api_keys import is_admin
from shared.errors import BadRequest
from shared.jobs import iso
from shared.usage import MAX_BUCKETS, STEP_S, UsageRow, UsageStore, bucket_count, bucket_starts, summed

bp = Blueprint("usage", __name__, url_prefix="/v1/usage")

# The range asked for when `start` is left out: the last day of hours, or the last 30 days.
DEFAULT_SPAN_S = {"hour": 24 * 3600, "day": 30 * 86400}
GRANULARITIES = tuple(STEP_S)


@bp.get("")
def read() -> dict[str, Any]:
    """Usage in [start, end) by `granularity`, per tenant and model, with the range's totals."""
    api = state.get()
    granularity = request.args.get("granularity", "day")
    if granularity not in STEP_S:
        raise BadRequest(
            f"granularity must be one of {', '.join(GRANULARITIES)}", details=[{"field": "granularity", "message": "unknown"}]
        )
    end_s = parse_time("end", request.args.get("end"))
    end_s = time.time() if end_s is None else end_s
    start_s = parse_time("start", request.args.get("start"))
    start_s = end_s - DEFAULT_SPAN_S[granularity] if start_s is None else start_s
    if start_s >= end_s:
        raise BadRequest("start must be before end", details=[{"field": "start", "message": "not before end"}])
    buckets = bucket_count(granularity, start_s, end_s)
    if buckets > MAX_BUCKETS[granularity]:
        raise BadRequest(
            f"at most {MAX_BUCKETS[granularity]} {granularity}s at once (that is how long they are kept)",
            details=[{"field": "start", "message": f"range spans {buckets} {granularity}s"}],
        )
    tenant = tenancy.tenant()
    admin = is_admin(tenant, api.settings.admin_tenants, current_app.extensions["ragq-keys"].enabled)
    store = UsageStore(api.store.redis)
    rows = store.buckets(granularity, start_s, end_s, store.tenants() if admin else [tenant])
    return {
        "object": "usage",
        "granularity": granularity,
        "start": iso(bucket_starts(granularity, start_s, end_s)[0]),
        "end": iso(end_s),
        "scope": "all" if admin else "tenant",
        "data": [_view(row, granularity) for row in rows],
        "totals": [_view(row, granularity) for row in summed(rows)],
    }


def _view(row: UsageRow, granularity: str) -> dict[str, Any]:
    view: dict[str, Any] = {"tenant": row.tenant, "model": row.model}
    if row.start is not None:
        view["start"] = iso(row.start)
        view["end"] = iso(row.start + STEP_S[granularity])
    view["jobs"] = int(row.figures["jobs"])
    view["prompt_tokens"] = int(row.figures["prompt_tokens"])
    view["completion_tokens"] = int(row.figures["completion_tokens"])
    view["generate_seconds"] = round(row.figures["generate_s"], 6)
    return view


# Times before this are not usage ragq can have recorded; after it, not a time at all.
EARLIEST_S = 0.0
LATEST_S = 253402300799.0  # 9999-12-31T23:59:59Z


def parse_time(name: str, raw: str | None) -> float | None:
    """An ISO 8601 time (`2026-11-29`, `2026-11-29T10:00:00Z`; without an offset: UTC) or Unix seconds; None if unset."""
    if raw is None or raw == "":
        return None
    value: float | None
    try:
        value = float(raw)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(raw.replace("Z", "+00:00") if raw.endswith("Z") else raw)
            value = (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
        except (ValueError, OverflowError):
            value = None
    if value is None or not math.isfinite(value) or not EARLIEST_S <= value <= LATEST_S:
        raise BadRequest(
            f"{name} must be an ISO 8601 time (2026-11-29T10:00:00Z) or Unix seconds",
            details=[{"field": name, "message": "not a time"}],
        )
    return value
