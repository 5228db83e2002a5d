"""The `ragq batch` and `ragq eval` client (`cli.batch`, `cli.progress`, `cli.evaluate`): its pure parts.

The commands run against a real stack in test_cli.py.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from cli import batch, evaluate
from cli.batch import batch_options, content_type_for, idempotency_key
from cli.evaluate import build_eval_batch, format_metrics, read_questions, retrieval_metrics
from cli.main import build_parser
from cli.progress import (
    ProgressBar,
    RateMeter,
    batch_exit_code,
    done_count,
    format_batch,
    format_batch_table,
    format_duration,
    format_progress,
)


def counts(total: int = 0, **values: int) -> dict[str, int]:
    base = {"total": total, "queued": 0, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 0, "expired": 0}
    return base | values


def make_batch(status: str = "in_progress", **count_values: int) -> dict[str, Any]:
    return {
        "id": "batch_1",
        "object": "batch",
        "status": status,
        "model": "flan-t5-base",
        "created_at": "2026-11-28T17:45:09.158Z",
        "in_progress_at": None,
        "completed_at": None,
        "cancelled_at": None,
        "expires_at": "2026-11-29T17:45:09.158Z",
        "completion_window": "24h",
        "metadata": {"run": "a"},
        "request_counts": counts(**count_values),
    }


# --- idempotency key and options ---------------------------------------------------------------------------------


def test_idempotency_key_is_sha256_hex_and_deterministic() -> None:
    key = idempotency_key(b"line\n", {"model": "m"})
    assert key == idempotency_key(b"line\n", {"model": "m"})
    assert len(key) == 64 and all(c in "0123456789abcdef" for c in key)


@pytest.mark.parametrize(
    ("data", "options"),
    [(b"other\n", {"model": "m"}), (b"line\n", {"model": "n"}), (b"line\n", {}), (b"line\n", {"model": "m", "x": "1"})],
)
def test_idempotency_key_changes_with_file_or_options(data: bytes, options: dict[str, str]) -> None:
    assert idempotency_key(data, options) != idempotency_key(b"line\n", {"model": "m"})


def test_idempotency_key_ignores_option_order() -> None:
    assert idempotency_key(b"x", {"a": "1", "b": "2"}) == idempotency_key(b"x", {"b": "2", "a": "1"})


def test_batch_options_leave_out_unset_ones() -> None:
    assert batch_options() == {}
    assert batch_options(model="m", callback_url="http://h/cb") == {"model": "m", "callback_url": "http://h/cb"}


def test_same_metadata_written_differently_gives_the_same_key() -> None:
    first = batch_options(metadata='{"b": 2, "a": 1}')
    second = batch_options(metadata='{"a":1,"b":2}')
    assert first == second == {"metadata": '{"a":1,"b":2}'}
    assert idempotency_key(b"x", first) == idempotency_key(b"x", second)


@pytest.mark.parametrize("metadata", ["not json", "[1, 2]", '"text"'])
def test_metadata_must_be_a_json_object(metadata: str) -> None:
    with pytest.raises(ValueError, match="metadata"):
        batch_options(metadata=metadata)


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("a.jsonl", "application/x-ndjson"),
        ("a.ndjson", "application/x-ndjson"),
        ("A.CSV", "text/csv"),
        ("a.json", "application/json"),
        ("a.txt", None),
        ("jsonl", None),
    ],
)
def test_content_type_follows_the_extension(name: str, content_type: str | None) -> None:
    assert content_type_for(Path(name)) == content_type


# --- progress ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0:00"), (59.6, "1:00"), (125, "2:05"), (3725, "1:02:05"), (-3, "0:00")]
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_format_progress_shows_bar_counts_percentage_rate_and_eta() -> None:
    line = format_progress(337, 674, 12.34, 27.3)
    assert line == "[############............] 337/674  50.0%  12.3/s  ETA 0:27"


def test_format_progress_with_unknown_rate_and_eta() -> None:
    assert format_progress(0, 10, None, None) == "[........................]  0/10   0.0%  --/s  ETA --"


def test_format_progress_when_done_and_when_empty() -> None:
    assert format_progress(10, 10, 2.0, 0).startswith("[" + "#" * 24 + "] 10/10 100.0%")
    assert "0/0   0.0%" in format_progress(0, 0, None, None)


def test_done_counts_every_ended_item() -> None:
    assert done_count(counts(10, succeeded=3, failed=2, cancelled=1, expired=1, queued=2, running=1)) == 7


def test_rate_is_over_the_recent_window() -> None:
    meter = RateMeter(window_s=10)
    assert meter.add(0, 0) is None
    assert meter.add(5, 50) == pytest.approx(10.0)
    assert meter.add(10, 100) == pytest.approx(10.0)
    # The burst at the start falls out of the window; only the last 10 s count.
    assert meter.add(20, 110) == pytest.approx(1.0)


def test_rate_never_goes_negative() -> None:
    meter = RateMeter(window_s=10)
    meter.add(0, 5)
    assert meter.add(1, 4) == 0.0


class FakeStream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_redraws_in_place_on_a_terminal() -> None:
    stream = FakeStream(tty=True)
    bar = ProgressBar(stream)
    bar.update(counts(10, succeeded=1), now=0)
    bar.update(counts(10, succeeded=5), now=1)
    bar.close()
    text = stream.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and text.count("\n") == 1
    assert "5/10" in text and "4.0/s" in text


def test_progress_prints_a_plain_line_every_interval_when_not_a_terminal() -> None:
    stream = FakeStream(tty=False)
    bar = ProgressBar(stream, plain_interval_s=10)
    for second in range(25):
        bar.update(counts(100, succeeded=second), now=second)
    bar.update(counts(100, succeeded=100), now=25.5, final=True)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert [line.split("]")[1].split()[0] for line in lines] == ["0/100", "10/100", "20/100", "100/100"]


def test_batch_exit_code() -> None:
    assert batch_exit_code(make_batch("completed", total=2, succeeded=2)) == 0
    assert batch_exit_code(make_batch("completed", total=2, succeeded=1, failed=1)) == 1
    assert batch_exit_code(make_batch("cancelled", total=2, succeeded=1, cancelled=1)) == 1
    assert batch_exit_code(make_batch("expired", total=2, succeeded=2)) == 1


def test_format_batch_shows_key_fields_and_counts() -> None:
    text = format_batch(make_batch(total=4, succeeded=1, failed=1, queued=2))
    lines = dict(line.split(None, 1) for line in text.splitlines())
    assert lines["id"] == "batch_1" and lines["status"] == "in_progress"
    assert lines["progress"] == "2/4 done (50.0%)"
    assert lines["requests"].startswith("succeeded 1  failed 1  cancelled 0  expired 0  queued 2")
    assert "completed_at" not in lines and lines["metadata"] == '{"run": "a"}'


def test_format_batch_table_aligns_columns() -> None:
    short = make_batch(total=3, succeeded=3) | {"status": "completed"}
    long = make_batch(total=100, failed=1) | {"id": "batch_22", "model": None}
    lines = format_batch_table([short, long])
    assert lines[0].split() == ["batch_1", "completed", "3/3", "2026-11-28T17:45:09.158Z", "flan-t5-base"]
    assert lines[1].split() == ["batch_22", "in_progress", "1/100", "2026-11-28T17:45:09.158Z", "-"]
    assert lines[0].index("3/3") == lines[1].index("1/100")
    assert format_batch_table([]) == []


# --- evaluation ----------------------------------------------------------------------------------------------------


def test_read_questions_reads_the_dev_set(shared_data: Path) -> None:
    rows = read_questions(shared_data / "questions-dev.csv")
    assert len(rows) == 674
    assert rows[0] == {
        "question": "Where can I find the structure for questions in this course?",
        "course": "mlops-zoomcamp",
        "document": "0560e827",
    }


def test_read_questions_accepts_a_byte_order_mark_and_extra_columns(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    path.write_text("\ufeffquestion,course,document,notes\nWhy?,c,d1,x\n", encoding="utf-8")
    assert read_questions(path) == [{"question": "Why?", "course": "c", "document": "d1"}]


def test_read_questions_names_missing_columns(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    path.write_text("question,course\nWhy?,c\n")
    with pytest.raises(ValueError, match="document"):
        read_questions(path)


def test_build_eval_batch_numbers_rows_from_one() -> None:
    rows = [{"question": "q1", "course": "c", "document": "d"}, {"question": "q2", "course": "c", "document": "e"}]
    lines = [json.loads(line) for line in build_eval_batch(rows, top_k=3).decode().splitlines()]
    assert lines == [
        {"custom_id": "1", "question": "q1", "course": "c", "top_k": 3},
        {"custom_id": "2", "question": "q2", "course": "c", "top_k": 3},
    ]
    assert "top_k" not in build_eval_batch(rows).decode()
    assert build_eval_batch(rows) == build_eval_batch(rows)


def result(custom_id: str, status: str, *source_ids: str) -> dict[str, Any]:
    return {"custom_id": custom_id, "status": status, "sources": [{"id": s} for s in source_ids]}


def test_retrieval_metrics_over_succeeded_rows() -> None:
    rows = [{"question": f"q{i}", "course": "c", "document": doc} for i, doc in enumerate(["a", "b", "c", "d", "e"])]
    results = [
        result("1", "succeeded", "a", "x"),  # rank 1
        result("2", "succeeded", "x", "y", "b"),  # rank 3
        result("3", "succeeded", "x"),  # absent
        result("4", "failed"),
        # Row 5 has no result at all.
    ]
    metrics = retrieval_metrics(rows, results)
    assert metrics["n"] == 3 and metrics["failed"] == 2
    assert metrics["hit_rate"] == pytest.approx(2 / 3)
    assert metrics["mrr"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert format_metrics(metrics) == "hit_rate 0.6667  mrr 0.4444  n 3  failed 2"


def test_retrieval_metrics_matches_by_custom_id_not_order() -> None:
    rows = [{"question": "q", "course": "c", "document": "a"}, {"question": "q", "course": "c", "document": "b"}]
    metrics = retrieval_metrics(rows, [result("2", "succeeded", "b"), result("1", "succeeded", "z", "a")])
    assert metrics["mrr"] == pytest.approx((0.5 + 1) / 2) and metrics["hit_rate"] == 1.0


def test_retrieval_metrics_with_nothing_succeeded() -> None:
    rows = [{"question": "q", "course": "c", "document": "a"}]
    assert retrieval_metrics(rows, [result("1", "expired")]) == {"hit_rate": 0.0, "mrr": 0.0, "n": 0, "failed": 1}


# --- the parser ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "func"),
    [
        (["batch", "submit", "f.jsonl", "--wait"], batch.cmd_batch_submit),
        (["batch", "status", "b1", "--json"], batch.cmd_batch_status),
        (["batch", "results", "b1", "-o", "out.jsonl", "--status", "failed"], batch.cmd_batch_results),
        (["batch", "cancel", "b1"], batch.cmd_batch_cancel),
        (["batch", "list", "--limit", "5"], batch.cmd_batch_list),
        (["eval", "q.csv", "--top-k", "3", "--json"], evaluate.cmd_eval),
    ],
)
def test_batch_commands_are_wired_into_ragq(argv: list[str], func: Any) -> None:
    args = build_parser().parse_args(argv)
    assert args.func is func and args.url == "http://127.0.0.1:8000"
