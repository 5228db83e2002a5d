import csv
import json
from pathlib import Path

import minsearch
import pytest

from shared.errors import CorpusError
from worker.corpus import document_id, load_documents, normalise
from worker.retrieval import Retriever


def test_builtin_corpus_loads_with_ids(tmp_path: Path) -> None:
    docs = load_documents(None, tmp_path)
    assert len(docs) >= 20
    assert {d["course"] for d in docs} == {"ragq"}
    assert all(len(d["id"]) == 8 for d in docs)


def test_nested_and_flat_forms_give_the_same_documents() -> None:
    nested = [{"course": "c", "documents": [{"text": "t", "section": "s", "question": "q"}]}]
    flat = [{"course": "c", "text": "t", "section": "s", "question": "q"}]
    assert normalise(nested) == normalise(flat) == [
        {"course": "c", "text": "t", "section": "s", "question": "q", "id": document_id("c", "q", "t")}
    ]


def test_a_document_keeps_its_own_id() -> None:
    [doc] = normalise([{"course": "c", "text": "t", "question": "q", "id": "mine"}])
    assert doc["id"] == "mine"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"course": "c"}, "non-empty JSON list"),
        ([], "non-empty JSON list"),
        ([1], "not an object"),
        ([{"course": "c", "documents": "x"}], "list `documents`"),
        ([{"text": "t", "question": "q"}], "course"),
        ([{"course": "c", "question": "q"}], "text"),
    ],
)
def test_malformed_corpora_are_refused(data: object, message: str) -> None:
    with pytest.raises(CorpusError, match=message):
        normalise(data)


def test_unreadable_and_invalid_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="cannot be read"):
        load_documents(str(tmp_path / "missing.json"), tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CorpusError, match="not valid JSON"):
        load_documents(str(bad), tmp_path)


def test_ids_reproduce_the_course_ids(shared_data: Path, tmp_path: Path) -> None:
    ours = load_documents(str(shared_data / "documents.json"), tmp_path)
    theirs = json.loads((shared_data / "documents-with-ids.json").read_text())
    assert [d["id"] for d in ours] == [d["id"] for d in theirs]


def test_retrieval_equals_the_seed_minsearch_for_every_dev_question(shared_data: Path, tmp_path: Path) -> None:
    raw = json.loads((shared_data / "documents.json").read_text())
    seed_docs = []
    for course in raw:
        for doc in course["documents"]:
            seed_docs.append({**doc, "course": course["course"]})
    seed = minsearch.Index(text_fields=["question", "text", "section"], keyword_fields=["course"])
    seed.fit(seed_docs)
    retriever = Retriever(load_documents(str(shared_data / "documents.json"), tmp_path))
    with (shared_data / "questions-dev.csv").open() as f:
        questions = list(csv.DictReader(f))
    assert len(questions) == 674
    batched = retriever.search_many([(row["question"], row["course"], 5) for row in questions])
    hits = 0
    for row in questions:
        expected = seed.search(
            row["question"], filter_dict={"course": row["course"]}, boost_dict={"question": 3.0, "section": 0.5}, num_results=5
        )
        got = retriever.search(row["question"], row["course"], 5)
        expected_ids = [document_id(d["course"], d["question"], d["text"]) for d in expected]
        assert [d["id"] for d in got] == expected_ids
        assert [d["id"] for d in batched.pop(0)] == expected_ids
        hits += row["document"] in expected_ids
    # The course's published figure for these settings.
    assert hits / len(questions) == pytest.approx(0.8813, abs=1e-4)


def test_course_filter_limits_results(shared_data: Path, tmp_path: Path) -> None:
    retriever = Retriever(load_documents(str(shared_data / "documents.json"), tmp_path))
    results = retriever.search("How do I run docker?", "mlops-zoomcamp", 20)
    assert len(results) == 20
    assert {d["course"] for d in results} == {"mlops-zoomcamp"}


def test_batched_search_handles_mixed_courses_sizes_and_no_course(shared_data: Path, tmp_path: Path) -> None:
    retriever = Retriever(load_documents(str(shared_data / "documents.json"), tmp_path))
    queries = [("How do I run docker?", None, 3), ("kafka consumer", "data-engineering-zoomcamp", 20), ("zzzz qqqq", "mlops-zoomcamp", 5)]
    assert retriever.search_many(queries) == [retriever.search(*q) for q in queries]
    assert retriever.search_many([]) == []
