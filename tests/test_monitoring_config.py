"""The monitoring files in deploy/: Prometheus scrapes what ragq serves, Grafana's dashboard asks only for ragq's
metrics (a renamed metric would leave a panel silently empty)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"

# Every metric ragq exports (README "Operating ragq"), by type: a histogram is queried through its series.
COUNTERS = {
    "ragq_api_requests_total",
    "ragq_jobs_submitted_total",
    "ragq_redis_errors_total",
    "ragq_usage_jobs_total",
    "ragq_usage_prompt_tokens_total",
    "ragq_usage_completion_tokens_total",
    "ragq_usage_generate_seconds_total",
    "ragq_jobs_finished_total",
    "ragq_prompt_tokens_total",
    "ragq_generated_tokens_total",
    "ragq_callbacks_total",
    "ragq_engine_restarts_total",
}
GAUGES = {"ragq_queue_depth", "ragq_jobs_running", "ragq_worker_up"}
HISTOGRAMS = {
    "ragq_api_request_duration_seconds",
    "ragq_microbatch_size",
    "ragq_generate_duration_seconds",
    "ragq_queue_wait_seconds",
}
SERIES = COUNTERS | GAUGES | {f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
# A metric name in PromQL: not a label (followed by `=`, `!=`, `=~`, `!~`) nor inside a string.
METRIC = re.compile(r"\b(ragq_[a-z0-9_]+)\b(?!\s*(=|!=|=~|!~))")


def metrics_in(expr: str) -> set[str]:
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    return {match.group(1) for match in METRIC.finditer(without_strings)}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return dict(json.loads((DEPLOY / "grafana/dashboards/ragq.json").read_text()))


@pytest.fixture(scope="module")
def prometheus() -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text()))


def test_metric_names_are_found_in_promql() -> None:
    expr = 'histogram_quantile(0.95, sum by (le) (rate(ragq_queue_wait_seconds_bucket{priority="ragq_x"}[5m])))'
    assert metrics_in(expr) == {"ragq_queue_wait_seconds_bucket"}
    assert metrics_in("sum(ragq_queue_depth) + ragq_jobs_running") == {"ragq_queue_depth", "ragq_jobs_running"}


def test_every_panel_queries_only_ragq_metrics(dashboard: dict[str, Any]) -> None:
    assert dashboard["panels"]
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used = metrics_in(target["expr"])
            assert used, (panel["title"], target["expr"])
            assert used <= SERIES, (panel["title"], used - SERIES)


def test_histograms_are_queried_by_bucket_sum_or_count_only(dashboard: dict[str, Any]) -> None:
    exprs = " ".join(target["expr"] for panel in dashboard["panels"] for target in panel["targets"])
    for histogram in HISTOGRAMS:
        assert not re.search(rf"\b{histogram}\b(?!_)", exprs), histogram


def test_the_dashboard_shows_what_an_operator_asks_for(dashboard: dict[str, Any]) -> None:
    used = {m for panel in dashboard["panels"] for t in panel["targets"] for m in metrics_in(t["expr"])}
    wanted = {
        "ragq_queue_depth",  # queue depth per model
        "ragq_jobs_finished_total",  # items/s finished, failed jobs
        "ragq_queue_wait_seconds_bucket",  # interactive p95 queue wait
        "ragq_generate_duration_seconds_bucket",  # generate time p95
        "ragq_microbatch_size_bucket",  # microbatch size
        "ragq_api_request_duration_seconds_bucket",  # API p99 latency
        "ragq_api_requests_total",  # error rates
        "ragq_redis_errors_total",
        "ragq_callbacks_total",  # callbacks failed
        "ragq_engine_restarts_total",  # engine restarts
        "ragq_usage_prompt_tokens_total",  # usage tokens per tenant
        "ragq_usage_completion_tokens_total",
    }
    assert wanted <= used, wanted - used
    interactive_wait = [
        t["expr"] for panel in dashboard["panels"] for t in panel["targets"] if "ragq_queue_wait_seconds" in t["expr"]
    ]
    assert any('priority="interactive"' in e and "histogram_quantile(0.95" in e for e in interactive_wait)


def test_panels_use_the_provisioned_datasource_and_do_not_overlap(dashboard: dict[str, Any]) -> None:
    provisioned = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    [source] = provisioned["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": source["uid"]}
        pos = panel["gridPos"]
        area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not area & cells, panel["title"]
        assert pos["x"] + pos["w"] <= 24
        cells |= area
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])


def test_grafana_loads_the_dashboard_directory_compose_mounts() -> None:
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/ragq.yml").read_text())
    [entry] = provider["providers"]
    assert entry["type"] == "file" and entry["options"]["path"] == "/var/lib/grafana/dashboards"


def test_prometheus_scrapes_the_api_and_every_worker_replica(prometheus: dict[str, Any]) -> None:
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    api = jobs["ragq-api"]
    assert api["metrics_path"] == "/metrics"
    assert api["static_configs"] == [{"targets": ["api:8000"]}]
    worker = jobs["ragq-worker"]
    assert worker["metrics_path"] == "/metrics"
    # DNS discovery of the compose service: one target per `--scale` replica, on RAGQ_METRICS_PORT's default.
    [discovery] = worker["dns_sd_configs"]
    assert discovery == {"names": ["worker"], "type": "A", "port": 9100, "refresh_interval": "15s"}


def test_prometheus_targets_are_compose_services(prometheus: dict[str, Any]) -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["api"]["environment"]["RAGQ_PORT"] == "8000"
    assert "9100" in services["worker"]["expose"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus)")
def test_promtool_accepts_the_prometheus_config() -> None:
    result = subprocess.run(
        ["promtool", "check", "config", "--syntax-only", str(DEPLOY / "prometheus/prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus)")
def test_promtool_parses_every_panel_query(dashboard: dict[str, Any], tmp_path: Path) -> None:
    # promtool parses PromQL in rule files: each panel's query becomes a recording rule, Grafana's variables
    # replaced by what Grafana would put there.
    rules = [
        {"record": f"ragq:panel_{panel['id']}_{target['refId']}", "expr": grafana_to_promql(target["expr"])}
        for panel in dashboard["panels"]
        for target in panel["targets"]
    ]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def grafana_to_promql(expr: str) -> str:
    return expr.replace("$__rate_interval", "1m").replace("$model", ".*")
