"""`ragq eval --retrieval`: one batch per mode, a comparison table or JSON, answer similarity with an answer column."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from cli.evaluate import build_eval_batch, eval_options, format_table, parse_modes, read_questions
from cli.redis_server import free_port
from shared.config import Settings
from tests.helpers import child_env, start_worker
from tests.tiny_embedder import build_tiny_embedder
from worker.corpus import load_documents

MODEL = "tiny-t5-chaos"


def ragq(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], env=env, capture_output=True, text=True, timeout=timeout)


def write_csv(path: Path, documents: list[dict[str, Any]], answers: bool) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["question", "course", "document"] + (["answer"] if answers else []))
        for doc in documents:
            writer.writerow([doc["question"], doc["course"], doc["id"]] + ([doc["text"]] if answers else []))
    return path


def test_modes_parse_from_commas_and_repeats() -> None:
    assert parse_modes(None) == [None]
    assert parse_modes(["text,vector", "hybrid", "text"]) == ["text", "vector", "hybrid"]
    with pytest.raises(ValueError, match="unknown retrieval mode 'fuzzy'"):
        parse_modes(["text,fuzzy"])


def test_the_eval_batch_carries_mode_and_references_only_when_evaluating(tmp_path: Path) -> None:
    rows = read_questions(write_csv(tmp_path / "q.csv", [{"question": "q", "course": "c", "id": "d1", "text": "t"}], True))
    assert rows == [{"question": "q", "course": "c", "document": "d1", "answer": "t"}]
    plain = [json.loads(line) for line in build_eval_batch(rows).splitlines()]
    assert plain == [{"custom_id": "1", "question": "q", "course": "c"}]
    assert eval_options(None, "vector", False, None) == {"retrieval": "vector"}
    scored = [json.loads(line) for line in build_eval_batch(rows, top_k=3, evaluate=True).splitlines()]
    assert scored == [
        {"custom_id": "1", "question": "q", "course": "c", "top_k": 3, "expected_document": "d1", "reference_answer": "t"}
    ]
    options = eval_options("m", None, True, 8)
    assert options == {"model": "m", "evaluate": "true", "params": json.dumps({"max_new_tokens": 8})}


def test_the_table_has_a_row_per_mode() -> None:
    runs = [
        {"retrieval": "text", "hit_rate": 0.5, "mrr": 0.25, "n": 4, "failed": 0, "answer_similarity": 0.125},
        {"retrieval": "vector", "hit_rate": 1.0, "mrr": 1.0, "n": 4, "failed": 0, "answer_similarity": None},
    ]
    header, text, vector = format_table(runs).splitlines()
    assert header.split() == ["retrieval", "hit_rate", "mrr", "n", "failed", "answer_similarity"]
    assert text.split() == ["text", "0.5000", "0.2500", "4", "0", "0.1250"]
    assert vector.split() == ["vector", "1.0000", "1.0000", "4", "0", "-"]


def test_an_unknown_mode_exits_2_before_contacting_a_server(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "q.csv", [{"question": "q", "course": "c", "id": "d", "text": "t"}], False)
    result = ragq("eval", str(path), "--retrieval", "semantic", "--url", f"http://127.0.0.1:{free_port()}", env=child_env(Settings()))
    assert result.returncode == 2 and "unknown retrieval mode 'semantic'" in result.stderr


@pytest.fixture(scope="module")
def api_url(settings: Settings, redis_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """A worker with the tiny embedder, and `python -m api` on a free port, on the session's Redis."""
    work = tmp_path_factory.mktemp("eval")
    embedder = build_tiny_embedder(work / "tiny-st")
    ours = dataclasses.replace(settings, embedding_model=str(embedder), data_dir=work / "data", port=free_port())
    worker = start_worker(ours, MODEL, redis.Redis.from_url(ours.effective_redis_url, decode_responses=True))
    env = child_env(ours)
    api = subprocess.Popen([sys.executable, "-m", "api"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{ours.port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{url}/readyz", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline and api.poll() is None, "the API did not start"
            time.sleep(0.2)
        yield url, env
    finally:
        api.terminate()
        api.wait(30)
        worker.stop()


@pytest.mark.slow
def test_eval_compares_modes_and_scores_answers(api_url: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    url, env = api_url
    documents = load_documents(None, tmp_path)[:4]
    path = write_csv(tmp_path / "eval.csv", documents, answers=True)
    short = ("--model", MODEL, "--max-new-tokens", "4", "--url", url)
    result = ragq("eval", str(path), "--retrieval", "text,vector,hybrid", "--json", *short, env=env)
    if result.returncode != 0:
        failed = requests.get(f"{url}/v1/batches/{json.loads(result.stdout)['runs'][0]['batch_id']}/results", timeout=10)
        raise AssertionError(f"{result.stderr[-2000:]}\n{failed.text[:2000]}")
    runs = json.loads(result.stdout)["runs"]
    assert [run["retrieval"] for run in runs] == ["text", "vector", "hybrid"]
    assert len({run["batch_id"] for run in runs}) == 3
    for run in runs:
        assert run["n"] == 4 and run["failed"] == 0
        assert 0.0 <= run["hit_rate"] <= 1.0 and 0.0 <= run["mrr"] <= run["hit_rate"]
        assert run["answer_n"] == 4 and -1.0 <= run["answer_similarity"] <= 1.0
    # The questions are the FAQ's own: text search finds each one's entry first.
    assert runs[0]["hit_rate"] == 1.0 and runs[0]["mrr"] == 1.0
    table = ragq("eval", str(path), "--retrieval", "text", "--retrieval", "hybrid", *short, env=env)
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.strip().splitlines()
    assert header.split()[0] == "retrieval" and "answer_similarity" in header
    assert [row.split()[0] for row in rows] == ["text", "hybrid"]
