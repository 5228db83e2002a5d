"""The RAG prompt: the course's structure, cut to the model's input length by dropping trailing sources."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from shared.errors import ConfigError

DEFAULT_TEMPLATE = """You're a course teaching assistant. Answer the QUESTION using only the facts from the CONTEXT.
If the CONTEXT does not contain the answer, say that you don't know.

QUESTION: {question}

CONTEXT:
{context}""".strip()

ENTRY_TEMPLATE = "section: {section}\nquestion: {question}\nanswer: {text}"


@dataclass(frozen=True)
class Prompt:
    """A built prompt and how many of the retrieved sources it holds (a prefix of them, in rank order)."""

    text: str
    sources_used: int


def check_template(template: str) -> str:
    """Return the template if it has exactly the `{question}` and `{context}` fields."""
    try:
        template.format(question="q", context="c")
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"prompt template may only use {{question}} and {{context}}: {exc!r}") from exc
    for name in ("{question}", "{context}"):
        if name not in template:
            raise ConfigError(f"prompt template must contain {name}")
    return template


def format_context(sources: Sequence[dict[str, Any]]) -> str:
    """One `section / question / answer` entry per source, separated by blank lines."""
    return "\n\n".join(
        ENTRY_TEMPLATE.format(section=doc.get("section", ""), question=doc.get("question", ""), text=doc.get("text", ""))
        for doc in sources
    )


def build_prompt(
    question: str,
    sources: Sequence[dict[str, Any]],
    *,
    template: str = DEFAULT_TEMPLATE,
    count_tokens: Callable[[str], int] | None = None,
    max_tokens: int | None = None,
) -> Prompt:
    """Fill the template; if it is longer than `max_tokens`, drop whole sources from the end. Never cut the question."""
    used = len(sources)
    while True:
        text = template.format(question=question, context=format_context(sources[:used]))
        if count_tokens is None or max_tokens is None or used == 0 or count_tokens(text) <= max_tokens:
            return Prompt(text=text, sources_used=used)
        used -= 1
