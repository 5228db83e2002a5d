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


class PromptFitter:
    """Fits a microbatch's prompts to the model's input length, keeping the most sources that fit (a prefix).

    Gives the prompts `build_prompt` gives, with far fewer tokenizer calls: each source entry is tokenized once
    (and remembered: FAQ entries recur across a backlog), the number of sources that fit is estimated by summing
    token counts, and the estimate is then checked exactly, for every prompt of the microbatch in one call to
    the tokenizer, moving one source at a time until the largest prefix that fits is found (token counts are not
    exactly additive where pieces meet, so the sum is only where the search starts).
    """

    # Entries remembered at most; a corpus larger than this is tokenized again, never wrongly.
    MAX_REMEMBERED = 100_000

    def __init__(
        self,
        count_prompts: Callable[[Sequence[str]], list[int]],
        count_pieces: Callable[[Sequence[str]], list[int]],
        template: str = DEFAULT_TEMPLATE,
    ) -> None:
        self.count_prompts = count_prompts
        self.count_pieces = count_pieces
        self.template = template
        self._entry_tokens: dict[str, int] = {}
        self._separator_tokens: int | None = None

    def fit(
        self, questions: Sequence[str], sources: Sequence[Sequence[dict[str, Any]]], budgets: Sequence[int]
    ) -> list[tuple[Prompt, int]]:
        """For each question, the prompt with the most of its sources that fits its budget, and its exact token
        count. With no source fitting, the bare prompt (whatever its length: the caller decides)."""
        entries = [[format_context([doc]) for doc in docs] for docs in sources]
        self._remember([entry for row in entries for entry in row])
        separator = self._separator()
        bases = self.count_prompts([self.template.format(question=q, context="") for q in questions])
        used = [self._estimate(base, [self._entry_tokens[e] for e in row], separator, budget)
                for base, row, budget in zip(bases, entries, budgets, strict=True)]
        counts: list[dict[int, int]] = [{} for _ in questions]
        while True:
            # Each prompt still searching asks for its count at `used`; all are counted in one call.
            asks = self._next_asks(used, counts, entries, budgets)
            if not asks:
                break
            texts = [self._text(questions[i], sources[i], u) for i, u in asks]
            for (i, u), count in zip(asks, self.count_prompts(texts), strict=True):
                counts[i][u] = count
            used = [self._step(u, counts[i], budgets[i]) for i, u in enumerate(used)]
        return [(Prompt(self._text(q, docs, u), u), counts[i][u]) for i, (q, docs, u) in enumerate(zip(questions, sources, used, strict=True))]

    def _remember(self, entries: list[str]) -> None:
        missing = list(dict.fromkeys(e for e in entries if e not in self._entry_tokens))
        if len(self._entry_tokens) + len(missing) > self.MAX_REMEMBERED:
            # Start over, keeping (counting again) what this microbatch needs.
            self._entry_tokens.clear()
            missing = list(dict.fromkeys(entries))
        self._entry_tokens.update(zip(missing, self.count_pieces(missing), strict=True))

    def _separator(self) -> int:
        if self._separator_tokens is None:
            # What joining two entries adds beyond their own tokens.
            a, b = "section: a\nquestion: b\nanswer: c", "section: d\nquestion: e\nanswer: f"
            joined, first, second = self.count_pieces([f"{a}\n\n{b}", a, b])
            self._separator_tokens = max(0, joined - first - second)
        return self._separator_tokens

    @staticmethod
    def _estimate(base: int, entry_tokens: list[int], separator: int, budget: int) -> int:
        total, used = base, 0
        for i, tokens in enumerate(entry_tokens):
            total += tokens + (separator if i else 0)
            if total > budget:
                break
            used += 1
        return used

    @staticmethod
    def _next_asks(
        used: list[int], counts: list[dict[int, int]], entries: list[list[str]], budgets: Sequence[int]
    ) -> list[tuple[int, int]]:
        asks = []
        for i, u in enumerate(used):
            if u not in counts[i]:
                asks.append((i, u))
            elif counts[i][u] <= budgets[i] and u < len(entries[i]) and u + 1 not in counts[i]:
                # It fits: is one more source too many? That settles it.
                asks.append((i, u + 1))
        return asks

    @staticmethod
    def _step(used: int, counts: dict[int, int], budget: int) -> int:
        if used in counts and counts[used] > budget and used > 0:
            return used - 1
        if used in counts and used + 1 in counts and counts[used + 1] <= budget:
            return used + 1
        return used

    def _text(self, question: str, sources: Sequence[dict[str, Any]], used: int) -> str:
        return self.template.format(question=question, context=format_context(sources[:used]))
