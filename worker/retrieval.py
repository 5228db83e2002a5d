"""FAQ retrieval with minsearch, using the course's settings exactly."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import minsearch

TEXT_FIELDS = ["question", "text", "section"]
KEYWORD_FIELDS = ["course"]
BOOST = {"question": 3.0, "section": 0.5}


class Retriever:
    """A minsearch index over the corpus, built once per worker process."""

    def __init__(self, documents: Sequence[dict[str, Any]]) -> None:
        self.documents = list(documents)
        self.index = minsearch.Index(text_fields=TEXT_FIELDS, keyword_fields=KEYWORD_FIELDS)
        self.index.fit(self.documents)

    def search(self, question: str, course: str | None, top_k: int) -> list[dict[str, Any]]:
        """The `top_k` best documents in rank order, filtered on `course` when given."""
        filter_dict = {"course": course} if course else {}
        return self.index.search(query=question, filter_dict=filter_dict, boost_dict=BOOST, num_results=top_k)


def source_view(doc: dict[str, Any], in_prompt: bool) -> dict[str, Any]:
    """What a job's `sources` show of a retrieved document."""
    return {
        "id": doc["id"],
        "course": doc["course"],
        "section": doc.get("section", ""),
        "question": doc["question"],
        "in_prompt": in_prompt,
    }
