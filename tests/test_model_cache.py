"""`ragq serve`'s first look at a model: the local hub cache, then one short request to the hub, no retries."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from cli.model_cache import CacheState, cache_dir, check_cache, hub_repo_id, is_cached
from cli.redis_server import free_port

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cached_snapshot(cache: Path, repo_id: str, files: tuple[str, ...]) -> None:
    """The layout huggingface_hub writes: refs/main names a commit whose snapshot folder holds the files."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name in files:
        (snapshot / name).write_text("{}")


class _AnyAnswer(BaseHTTPRequestHandler):
    def do_HEAD(self) -> None:
        self.send_response(404)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def live_hub() -> Iterator[str]:
    """A loopback HTTP server standing in for a hub that answers (any status counts as reachable)."""
    server = HTTPServer(("127.0.0.1", 0), _AnyAnswer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("source", "repo_id"),
    [
        ("google/flan-t5-base", "google/flan-t5-base"),
        ("gpt2", "gpt2"),
        ("/models/t5", None),
        ("./t5", None),
        ("sim:t5-small", None),
    ],
)
def test_hub_ids_are_told_from_local_paths_and_simulated_models(source: str, repo_id: str | None) -> None:
    assert hub_repo_id(source) == repo_id


def test_the_cache_is_found_where_the_children_look_for_it(tmp_path: Path) -> None:
    assert cache_dir({"HF_HOME": str(tmp_path)}) == tmp_path / "hub"
    assert cache_dir({"HF_HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "c")}) == tmp_path / "c"


def test_a_snapshot_counts_as_cached_only_with_config_and_weights(tmp_path: Path) -> None:
    cached_snapshot(tmp_path, "org/full", ("config.json", "model.safetensors"))
    cached_snapshot(tmp_path, "org/config-only", ("config.json",))
    assert is_cached("org/full", tmp_path)
    assert not is_cached("org/config-only", tmp_path)
    assert not is_cached("org/absent", tmp_path)


def test_an_uncached_model_with_the_hub_offline_is_unavailable(tmp_path: Path) -> None:
    report = check_cache("google/flan-t5-base", {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert report.state is CacheState.UNAVAILABLE
    assert "HF_HUB_OFFLINE" in report.why_unreachable


def test_an_uncached_model_with_the_hub_unreachable_is_unavailable(tmp_path: Path) -> None:
    # Nothing listens on that port: the connection is refused at once, and asked only once.
    env = {"HF_HOME": str(tmp_path), "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    report = check_cache("google/flan-t5-base", env)
    assert report.state is CacheState.UNAVAILABLE
    assert "cannot be reached" in report.why_unreachable


def test_an_uncached_model_with_a_live_hub_is_downloadable(tmp_path: Path, live_hub: str) -> None:
    report = check_cache("google/flan-t5-base", {"HF_HOME": str(tmp_path), "HF_ENDPOINT": live_hub})
    assert report.state is CacheState.DOWNLOADABLE and report.hub_reachable


def test_a_cached_model_is_served_from_the_cache_even_offline(tmp_path: Path) -> None:
    cached_snapshot(tmp_path / "hub", "google/flan-t5-base", ("config.json", "model.safetensors"))
    report = check_cache("google/flan-t5-base", {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert report.state is CacheState.CACHED and not report.hub_reachable


def test_a_local_directory_needs_no_hub(tmp_path: Path) -> None:
    assert check_cache(str(tmp_path), {"HF_HUB_OFFLINE": "1"}).state is CacheState.NOT_HUB
