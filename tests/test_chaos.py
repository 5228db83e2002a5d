"""A short chaos run: workers SIGKILLed every few seconds and Redis killed and restarted, nothing lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import chaos

# Kills workers and restarts Redis under load: tens of seconds.
pytestmark = pytest.mark.slow


# Lost messages are found and sent again after about a minute: give the run room for that.
@pytest.mark.timeout(900)
def test_nothing_is_lost_under_worker_kills_and_a_redis_restart(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    code = chaos.main(
        ["--workers", "2", "--jobs", "200", "--kills", "3", "--kill-every-s", "3", "--timeout-s", "600", "--json", str(out)]
    )
    figures = json.loads(out.read_text())
    assert figures["lost"] == 0, figures
    assert figures["duplicate_visible_results"] == 0, figures
    assert figures["succeeded"] + figures["failed"] == 200
    # A job may fail only by using up its attempts (its workers all killed under it), never from a fault.
    assert set(figures.get("failed_by_error", {})) <= {"worker_lost"}, figures
    assert figures["worker_kills"] == 3
    assert "redis_restart" in figures
    assert code == 0
