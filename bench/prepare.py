"""`python -m bench.prepare`: what a worker spends between `generate` calls to get a microbatch ready.

The course's questions over the course FAQ go through the worker's pipeline in microbatches of B, with a model
whose `generate` returns at once: what is left is retrieval, prompt building and fitting (dropping trailing
sources until the prompt fits `--max-input-tokens`) and token counting, the serial work a device waits for.
Reported per model family (a tiny T5, and a tiny Phi-3 with its chat template): ms per microbatch, prompts/s,
tokenizer calls per prompt, and how many prompts had sources dropped to fit.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import report
from worker.corpus import load_documents
from worker.generation import Generation, Generator, load_generator
from worker.pipeline import Question, answer_microbatch
from worker.retrieval import Retriever
from worker.tiny import build_tiny_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


class CountingTokenizer:
    """Wraps a tokenizer, counting the texts it encodes (a batch of 128 counts 128, in one call)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0
        self.texts = 0

    def __call__(self, text: Any, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        self.texts += len(text) if isinstance(text, list) else 1
        return self.inner(text, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def instant(generator: Generator) -> Generator:
    """The generator with a `generate` that answers at once, so only the work around it is measured."""

    def generate(prompts: list[str], params: dict[str, Any]) -> list[Generation]:
        return [Generation("", 0, 0) for _ in prompts]

    generator.generate = generate  # type: ignore[method-assign]
    return generator


def measure(generator: Generator, retriever: Retriever, questions: list[Question], size: int) -> dict[str, Any]:
    """Run the questions through the pipeline in microbatches of `size`; the figures of that run."""
    counting = CountingTokenizer(generator.tokenizer)
    generator.tokenizer = counting  # type: ignore[assignment]
    dropped = 0
    started = time.perf_counter()
    for start in range(0, len(questions), size):
        for result in answer_microbatch(questions[start : start + size], retriever, generator):
            assert not isinstance(result, Exception), result
            dropped += any(not source["in_prompt"] for source in result.sources)
    seconds = time.perf_counter() - started
    generator.tokenizer = counting.inner
    microbatches = -(-len(questions) // size)
    return {
        "ms_per_microbatch": round(seconds * 1000 / microbatches, 1),
        "prompts_per_s": round(len(questions) / seconds, 1),
        "tokenizer_calls_per_prompt": round(counting.calls / len(questions), 2),
        "texts_tokenized_per_prompt": round(counting.texts / len(questions), 2),
        "prompts_with_sources_dropped": dropped,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512, help="questions (default 512)")
    parser.add_argument("--microbatch-size", type=int, default=128, help="B (default 128)")
    parser.add_argument("--max-input-tokens", type=int, default=512, help="prompt cap in tokens (default 512)")
    parser.add_argument("--data", type=Path, default=DATA, help=f"course data folder (default {DATA})")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    if not (args.data / "questions-dev.csv").exists():
        parser.error(f"needs the course data in {args.data}")
    with (args.data / "questions-dev.csv").open() as f:
        rows = list(csv.DictReader(f))
    # A fixed answer length: decoder-only models fit prompt and answer into one window.
    params = {"max_new_tokens": 32}
    questions = [Question(rows[i % len(rows)]["question"], rows[i % len(rows)]["course"], 5, params) for i in range(args.n)]
    retriever = Retriever(load_documents(str(args.data / "documents.json"), Path(tempfile.mkdtemp())))
    figures: dict[str, Any] = {"n": args.n, "microbatch_size": args.microbatch_size, "max_input_tokens": args.max_input_tokens}
    with tempfile.TemporaryDirectory() as root:
        for shape in ("t5", "phi3"):
            path = build_tiny_model(Path(root) / shape, shape)
            generator = instant(load_generator(str(path), device="cpu", max_input_tokens=args.max_input_tokens))
            answer_microbatch(questions[:8], retriever, generator)  # warm-up: first calls pay for lazy set-up
            for name, value in measure(generator, retriever, questions, args.microbatch_size).items():
                figures[f"{shape}_{name}"] = value
    report(figures, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
