"""How the batch commands show a batch: the progress bar, its rate and ETA, and the status and list formats."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from shared.batches import BatchStatus
from shared.jobs import JobStatus

# An item's final statuses (succeeded, failed, cancelled, expired): together they are the "done" of the progress.
ENDED_ITEM_STATUSES = tuple(status for status in JobStatus if status.is_final)
# Every item status, the ended ones first: the order counts are printed in.
COUNTED_STATUSES = (*ENDED_ITEM_STATUSES, *(status for status in JobStatus if not status.is_final))
# Long enough to smooth the bursts in which batched generation finishes items, short enough to follow changes.
RATE_WINDOW_S = 30.0
PLAIN_PROGRESS_INTERVAL_S = 10.0
PROGRESS_BAR_WIDTH = 24


def done_count(counts: Mapping[str, int]) -> int:
    """Items that have ended, whichever way: succeeded, failed, cancelled or expired."""
    return sum(int(counts.get(status) or 0) for status in ENDED_ITEM_STATUSES)


def format_duration(seconds: float) -> str:
    """`m:ss`, or `h:mm:ss` from an hour up."""
    total_s = max(0, int(round(seconds)))
    hours, rest = divmod(total_s, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_progress(done: int, total: int, rate: float | None, eta_s: float | None) -> str:
    """One progress line: bar, done/total, percentage, items per second and ETA (`--` when unknown)."""
    fraction = min(1.0, done / total) if total > 0 else 0.0
    filled = int(fraction * PROGRESS_BAR_WIDTH)
    bar = "#" * filled + "." * (PROGRESS_BAR_WIDTH - filled)
    rate_text = f"{rate:.1f}/s" if rate is not None else "--/s"
    eta_text = format_duration(eta_s) if eta_s is not None else "--"
    width = len(str(total))
    return f"[{bar}] {done:>{width}}/{total} {fraction * 100:5.1f}%  {rate_text}  ETA {eta_text}"


class RateMeter:
    """Items per second over the last `window_s` seconds of (time, done) samples."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, done: int) -> float | None:
        """Record a sample and return the recent rate; None until two samples span some time."""
        self.samples.append((now, done))
        # Keep the newest sample at or before the window's start, so the rate always spans the whole window.
        while len(self.samples) >= 2 and self.samples[1][0] <= now - self.window_s:
            self.samples.popleft()
        first_t, first_done = self.samples[0]
        elapsed_s = now - first_t
        if elapsed_s <= 0:
            return None
        return max(0.0, (done - first_done) / elapsed_s)


def eta_seconds(done: int, total: int, rate: float | None) -> float | None:
    """Seconds left at the current rate; None when the rate is unknown or zero."""
    if not rate or rate <= 0:
        return None
    return max(0, total - done) / rate


class ProgressBar:
    """Batch progress on a stream: redrawn in place on a terminal, one plain line every ~10 s otherwise."""

    def __init__(
        self,
        stream: TextIO,
        *,
        in_place: bool | None = None,
        plain_interval_s: float = PLAIN_PROGRESS_INTERVAL_S,
        window_s: float = RATE_WINDOW_S,
    ) -> None:
        self.stream = stream
        self.in_place = stream.isatty() if in_place is None else in_place
        self.plain_interval_s = plain_interval_s
        self.meter = RateMeter(window_s)
        self._last_plain_at: float | None = None
        self._drawn_chars = 0

    def update(self, counts: Mapping[str, int], now: float, *, final: bool = False) -> None:
        """Show the batch's request counts at time `now`; `final` forces a plain line out."""
        done, total = done_count(counts), int(counts.get("total") or 0)
        rate = self.meter.add(now, done)
        line = format_progress(done, total, rate, eta_seconds(done, total, rate))
        if self.in_place:
            # Pad with spaces to wipe what is left of a longer previous line.
            self.stream.write("\r" + line.ljust(self._drawn_chars))
            self._drawn_chars = len(line)
        elif final or self._last_plain_at is None or now - self._last_plain_at >= self.plain_interval_s:
            self.stream.write(line + "\n")
            self._last_plain_at = now
        self.stream.flush()

    def close(self) -> None:
        """End the line being redrawn, so what follows starts on a line of its own."""
        if self.in_place and self._drawn_chars:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn_chars = 0


def batch_exit_code(batch: Mapping[str, Any]) -> int:
    """0 if the batch completed and every item succeeded, else 1."""
    counts = batch.get("request_counts") or {}
    unsuccessful = sum(int(counts.get(status) or 0) for status in ENDED_ITEM_STATUSES if status != JobStatus.SUCCEEDED)
    return 0 if batch.get("status") == BatchStatus.COMPLETED and unsuccessful == 0 else 1


def format_counts(counts: Mapping[str, int]) -> str:
    """`succeeded 3  failed 1  ...` for every count but the total."""
    return "  ".join(f"{status} {int(counts.get(status) or 0)}" for status in COUNTED_STATUSES)


def format_batch(batch: Mapping[str, Any]) -> str:
    """The batch object's key fields and counts, one `name  value` line each; unset timestamps left out."""
    counts = batch.get("request_counts") or {}
    done, total = done_count(counts), int(counts.get("total") or 0)
    percent = f" ({done / total * 100:.1f}%)" if total else ""
    fields: list[tuple[str, Any]] = [
        ("id", batch.get("id")),
        ("status", batch.get("status")),
        ("model", batch.get("model")),
        ("progress", f"{done}/{total} done{percent}"),
        ("requests", format_counts(counts)),
        ("completion_window", batch.get("completion_window")),
    ]
    for name in ("created_at", "in_progress_at", "completed_at", "cancelled_at", "expires_at"):
        if batch.get(name):
            fields.append((name, batch[name]))
    if batch.get("metadata"):
        fields.append(("metadata", json.dumps(batch["metadata"])))
    width = max(len(name) for name, _ in fields)
    return "\n".join(f"{name:<{width}}  {'-' if value is None else value}" for name, value in fields)


def format_batch_table(batches: Sequence[Mapping[str, Any]]) -> list[str]:
    """One aligned line per batch: id, status, done/total, created_at, model."""
    rows = []
    for batch in batches:
        counts = batch.get("request_counts") or {}
        rows.append(
            [
                str(batch.get("id")),
                str(batch.get("status")),
                f"{done_count(counts)}/{int(counts.get('total') or 0)}",
                str(batch.get("created_at") or "-"),
                str(batch.get("model") or "-"),
            ]
        )
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
