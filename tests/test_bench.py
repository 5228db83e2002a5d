"""The benchmarks run end to end on the tiny shape (a smoke test: figures are checked for shape, not speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cli.processes import child_env

# Short runs of the benchmarks: a stack of processes each.
pytestmark = pytest.mark.slow


def run_bench(name: str, out: Path, *args: str) -> tuple[dict[str, Any], str]:
    """`python -m bench.NAME ARGS --json OUT` in a clean ragq environment, offline; its figures and stdout."""
    result = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=child_env(HF_HUB_OFFLINE="1"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout


def test_throughput_benchmark_tiny_shape_writes_its_figures(shared_data: Path, tmp_path: Path) -> None:
    figures, stdout = run_bench(
        "throughput", tmp_path / "figures.json", "--shape", "tiny", "--n", "24", "--seed-n", "8",
        "--microbatch-size", "8", "--new-tokens", "4", "--clients", "24", "--data", str(shared_data),
    )
    for key in ("seed_loop_qps", "inprocess_batched_qps", "system_qps", "system_p50_ms", "system_p95_ms", "b_over_a", "c_over_b"):
        assert figures[key] > 0, key
    assert figures["n"] == 24 and figures["shape"] == "tiny" and figures["device"] == "cpu"
    assert figures["system_p50_ms"] <= figures["system_p95_ms"]
    assert "(c) system" in stdout and "c/b" in stdout


def test_load_benchmark_gets_no_errors_and_exactly_the_quota_429s(tmp_path: Path) -> None:
    figures, _ = run_bench(
        "load", tmp_path / "load.json", "--clients", "4", "--seconds", "3", "--quota", "5", "--rate", "40",
        "--long-polls", "40", "--half-open", "10", "--probes", "10",
    )
    assert figures["errors"] == 0 and figures["jobs_done"] > 0
    assert figures["submit_p50_ms"] <= figures["submit_p99_ms"]
    assert figures["long_poll_answer_after_finish_p50_ms"] >= 0
    assert (figures["quota_accepted"], figures["quota_429"]) == (5, 20)
    assert (figures["rate_accepted"], figures["rate_429"]) == (40, 20)
    # The crowd: long-polls all answered once their jobs were cancelled, slow clients cut, probes fast.
    assert figures["long_poll_answers"] == {"200": 40} and figures["half_open_cut_by_api"] > 0
    assert figures["healthz_p99_ms"] < 1000 and figures["crowd_submit_p99_ms"] < 1000


def test_throughput_benchmark_sim_shape_reports_the_device_busy_fraction(shared_data: Path, tmp_path: Path) -> None:
    figures, stdout = run_bench(
        "throughput", tmp_path / "figures.json", "--shape", "sim-xl", "--n", "32", "--seed-n", "2",
        "--microbatch-size", "16", "--new-tokens", "4", "--cpu-share", "0", "--data", str(shared_data),
    )
    assert figures["shape"] == "sim-xl" and figures["cpu_share"] == 0.0 and figures["submit"] == "batch"
    for key in ("device_busy_fraction", "inprocess_device_busy_fraction"):
        assert 0 < figures[key] <= 1.0, key
    assert figures["busy_c_over_b"] > 0 and figures["c_over_b"] > 0
    assert set(figures["system_cpu_ms_per_job"]) == {"api", "worker", "engine", "redis"}
    # The model runs in the worker's engine process (the default), and its time is counted apart.
    assert figures["engine"] == "process"
    assert figures["system_cpu_ms_per_job"]["worker"] > 0 and figures["system_cpu_ms_per_job"]["engine"] > 0
    assert "device busy fraction (c)" in stdout
