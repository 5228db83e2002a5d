"""`ragq serve`'s parent process: it starts workers and the API as programs and never imports torch itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli.processes import child_env
from cli.redis_server import free_port
from cli.serve import check_model_in_child
from shared.models import ModelSpec

# Starts the supervisor's children and a model check in a child process.
pytestmark = pytest.mark.slow

# Runs the supervisor's start-up (settings, the model check, embedded Redis, spawning every child), stops it again,
# and reports what this process imported meanwhile.
START_UP = """
import dataclasses, json, sys
from cli.serve import Supervisor
from shared.config import Settings

supervisor = Supervisor(dataclasses.replace(Settings.from_env(), fallback_tiny_model=True), workers=2)
try:
    env = supervisor.start()
    children = [name for name, _ in supervisor.children]
finally:
    supervisor.stop()
loaded = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "worker", "api"})
print(json.dumps({"started": env is not None, "children": children, "loaded": loaded}))
"""


def test_serve_start_up_imports_neither_torch_nor_transformers(tmp_path: Path) -> None:
    env = child_env(
        HF_HUB_OFFLINE="1",
        RAGQ_MODEL=str(tmp_path / "no-model"),
        RAGQ_DATA_DIR=str(tmp_path / "data"),
        RAGQ_PORT=str(free_port()),
    )
    result = subprocess.run([sys.executable, "-c", START_UP], env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    *notices, last = result.stdout.strip().splitlines()
    report = json.loads(last)
    # The model check ran (in a child) and found the model missing, so the stand-in is announced.
    assert any("stand-in" in line for line in notices), result.stdout
    assert report == {"started": True, "children": ["worker-1", "worker-2", "api"], "loaded": []}


def test_the_model_check_in_a_child_says_what_the_check_in_process_says(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    from worker.model_check import check_model

    env = child_env(HF_HUB_OFFLINE="1")
    missing = ModelSpec("missing", str(tmp_path / "no-model"))
    problem = check_model_in_child(missing, env)
    assert problem and problem == check_model(missing)
    assert check_model_in_child(ModelSpec("tiny", str(tiny_models["t5"])), env) is None
