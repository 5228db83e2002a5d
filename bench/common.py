"""Pieces every benchmark uses: stopping the process groups it started, printing and saving figures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def child_env(**settings: str) -> dict[str, str]:
    """This process's environment without ragq settings of its own, offline, plus `settings` for the children."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAGQ_") and k != "REDIS_URL"}
    env["HF_HUB_OFFLINE"] = "1"
    env.update(settings)
    return env


def stop_groups(children: Iterable[subprocess.Popen[bytes]], grace_s: float = 30) -> None:
    """SIGTERM each child's process group, wait, then SIGKILL what is left."""
    children = list(children)
    for child in children:
        try:
            os.killpg(child.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for child in children:
        try:
            child.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()


def report(figures: dict[str, Any], json_path: Path | None) -> None:
    """Print the figures as an aligned table and, with a path, write them as JSON."""
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(figures, indent=2))


def start_api(work: Path, env: dict[str, str], processes: int = 1) -> subprocess.Popen[bytes]:
    """`ragq api` on `env`'s RAGQ_PORT, its log in `work`; returns once `/readyz` answers."""
    import sys
    import time

    import requests

    with (work / "api.log").open("ab") as log:
        api = subprocess.Popen(
            [sys.executable, "-m", "api", "--processes", str(processes)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{env['RAGQ_PORT']}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if requests.get(f"{url}/readyz", timeout=2).ok:
                return api
        except requests.RequestException:
            pass
        if time.monotonic() > deadline or api.poll() is not None:
            stop_groups([api])
            raise RuntimeError(f"the API did not start; see {work / 'api.log'}")
        time.sleep(0.2)
