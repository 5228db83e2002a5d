"""The API's Prometheus metrics and `GET /metrics` (docs/design.md "Metrics").

Two kinds: counters of this process (requests, submissions, Redis errors), added up over gunicorn's processes
through prometheus_client's multiprocess files when there are several; and figures read from Redis at scrape
time (queue depths, jobs held by workers, usage per tenant), the same whichever process is asked.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator

import redis
from flask import Flask, Response, g, request
from prometheus_client import REGISTRY, CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from api import tenancy
from shared import overview
from shared.api_keys import is_admin
from shared.config import Settings
from shared.errors import Forbidden
from shared.metrics import HTTP_METHODS, MULTIPROC_ENV, REQUEST_BUCKETS_S, redis_errors_counter
from shared.usage import UsageStore

log = logging.getLogger(__name__)

REQUESTS = Counter("ragq_api_requests", "HTTP requests answered, by route (the URL rule), method and status.", ["route", "method", "status"])
REQUEST_DURATION = Histogram(
    "ragq_api_request_duration_seconds", "Time to answer a request (a streamed body: until it starts).",
    ["route", "method"], buckets=REQUEST_BUCKETS_S,
)
JOBS_SUBMITTED = Counter("ragq_jobs_submitted", "Jobs accepted: interactive jobs and batch items.", ["model", "kind"])
REDIS_ERRORS = redis_errors_counter()


def init_app(app: Flask, settings: Settings) -> None:
    """Time and count every request; serve `GET /metrics`. Register before anything that can refuse a request."""
    registry = CollectorRegistry(auto_describe=False)
    # First: a Redis error it meets is then counted in the same scrape's ragq_redis_errors_total.
    registry.register(RedisFigures(app))
    if os.environ.get(MULTIPROC_ENV):
        MultiProcessCollector(registry)
    else:
        registry.register(_ThisProcess())

    @app.before_request
    def start_timer() -> None:
        g.metrics_started = time.perf_counter()

    @app.after_request
    def count(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        method = request.method if request.method in HTTP_METHODS else "other"
        REQUESTS.labels(route, method, str(response.status_code)).inc()
        started = g.get("metrics_started")
        if started is not None:
            REQUEST_DURATION.labels(route, method).observe(time.perf_counter() - started)
        return response

    def metrics() -> Response:
        if settings.metrics_require_key:
            ring = app.extensions["ragq-keys"]
            if ring.enabled and not is_admin(tenancy.authenticate(ring), settings.admin_tenants, True):
                raise Forbidden("/metrics names every tenant: it needs the key of a tenant in RAGQ_ADMIN_TENANTS")
        return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)

    app.add_url_rule("/metrics", "metrics", metrics, methods=["GET"])


def jobs_submitted(model: str, kind: str, count: int = 1) -> None:
    """`count` jobs of `kind` (job, batch_item) for `model` were accepted."""
    JOBS_SUBMITTED.labels(model, kind).inc(count)


def redis_error(component: str) -> None:
    """A request met a Redis error in `component`."""
    REDIS_ERRORS.labels(component).inc()


class _ThisProcess:
    """The default registry's metrics (this module's, and the process's CPU and memory) in a per-app registry."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def read_queue_depths(client: redis.Redis, models: list[str]) -> dict[str, dict[str, int]]:
    """Per model: what `GET /v1/models` shows as its queues (shared.overview), its live workers' held jobs included."""
    workers = overview.live_workers(client)
    return {
        model: overview.queue_depths(client, model, [w["name"] for w in workers if w.get("model") == model])
        for model in models
    }


class RedisFigures:
    """Figures read from Redis at each scrape: queue depths, jobs running, usage per tenant and model.

    A scrape while Redis is away leaves them out (and counts the error) rather than failing the whole page."""

    def __init__(self, app: Flask) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        api = self.app.extensions["ragq"]
        client = api.store.redis
        try:
            depths = read_queue_depths(client, api.settings.model_names)
            usage = UsageStore(client).totals()
        except redis.RedisError as exc:
            log.warning("metrics: cannot read Redis: %s", exc)
            redis_error("metrics")
            return
        queued = GaugeMetricFamily("ragq_queue_depth", "Jobs waiting for a worker, by model and queue.", labels=["model", "queue"])
        running = GaugeMetricFamily("ragq_jobs_running", "Jobs held by workers (claimed or reserved), by model.", labels=["model"])
        for model, depth in depths.items():
            queued.add_metric([model, "interactive"], depth["interactive_queued"])
            queued.add_metric([model, "backlog"], depth["backlog_pending"])
            running.add_metric([model], depth["running"])
        yield queued
        yield running
        families = {
            "jobs": CounterMetricFamily("ragq_usage_jobs", "Jobs succeeded, per tenant and model.", labels=["tenant", "model"]),
            "prompt_tokens": CounterMetricFamily("ragq_usage_prompt_tokens", "Prompt tokens of succeeded jobs.", labels=["tenant", "model"]),
            "completion_tokens": CounterMetricFamily(
                "ragq_usage_completion_tokens", "Tokens generated for succeeded jobs.", labels=["tenant", "model"]
            ),
            "generate_s": CounterMetricFamily(
                "ragq_usage_generate_seconds", "Generate time of succeeded jobs (each its share of its call).", labels=["tenant", "model"]
            ),
        }
        for row in usage:
            for figure, family in families.items():
                family.add_metric([row.tenant, row.model], row.figures[figure])
        yield from families.values()
