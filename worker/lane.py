"""The model's lane: where prepared microbatches wait for the model and run on it, one at a time.

A lane holds the microbatches the microbatcher has handed it. It runs them one after the other, interactive
ones first. A backlog microbatch starts only once the microbatcher has allowed it: when the lane is free and
its next candidate is a backlog microbatch, it asks (`LaneEvents.asks`), and the microbatcher answers with
`Lane.allow` after the interactive hand-off (see `worker.handoff`). So the next backlog microbatch waits in
the lane, prepared, while the current one runs, and the hand-off still decides at the moment the model is
free, as it did when the model ran on the microbatcher's own thread.

Two lanes: `LocalLane`, a thread of the worker process (`RAGQ_ENGINE=thread`), and `worker.engine.EngineLane`,
a process of its own (the default). Both use `LaneQueue` for the order.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)

# Priorities: lower runs first (the same numbers as the microbatcher's).
INTERACTIVE = 0


class LaneEvents(Protocol):
    """What a lane tells the microbatcher. Called from the lane's threads; must not block."""

    def started(self, key: int) -> None:
        """Microbatch `key` is on the model now."""
        ...

    def done(self, key: int, results: Sequence[Any]) -> None:
        """Microbatch `key` ended: one result per item (a value, an exception, or `SKIPPED`)."""
        ...

    def asks(self, key: int) -> None:
        """The lane is free and would start backlog microbatch `key` next: may it?"""
        ...


class Lane(Protocol):
    """Where microbatches run on the model."""

    def open(self, events: LaneEvents) -> None:
        """Start running; report to `events`."""
        ...

    def submit(self, key: int, priority: int, items: Sequence[Any], prepared: Any) -> None:
        """Queue a prepared microbatch. Interactive ones go first; backlog ones wait to be allowed."""
        ...

    def allow(self, key: int) -> None:
        """Backlog microbatch `key` may start."""
        ...

    def stop(self) -> None:
        """Stop once everything submitted has ended."""
        ...


@dataclass(order=True)
class LaneEntry:
    """One microbatch waiting in a lane."""

    priority: int
    seq: int
    key: int = field(compare=False)
    work: Any = field(compare=False)
    allowed: bool = field(default=False, compare=False)


class LaneQueue:
    """The order of a lane: interactive first, then backlog in arrival order, a backlog entry only once allowed."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._entries: list[LaneEntry] = []
        self._allowed: set[int] = set()
        self._seq = 0
        self._closed = False

    def put(self, key: int, priority: int, work: Any) -> None:
        with self._changed:
            self._seq += 1
            self._entries.append(LaneEntry(priority, self._seq, key, work, allowed=key in self._allowed))
            self._changed.notify_all()

    def allow(self, key: int) -> None:
        with self._changed:
            # An allow may overtake its microbatch (the engine's pipe and the worker's threads): kept until it comes.
            self._allowed.add(key)
            for entry in self._entries:
                if entry.key == key:
                    entry.allowed = True
            self._changed.notify_all()

    def close(self) -> None:
        """`take` returns None once the entries are gone."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def drain(self) -> list[LaneEntry]:
        """Remove and return every entry (the lane is going away)."""
        with self._changed:
            entries, self._entries = self._entries, []
            return entries

    def __len__(self) -> int:
        with self._changed:
            return len(self._entries)

    def take(self, ask: Any) -> LaneEntry | None:
        """The next entry to run, waiting as needed; `ask(key)` once when the next is a backlog entry not yet
        allowed. None when closed and empty."""
        asked = False
        with self._changed:
            while True:
                if not self._entries:
                    if self._closed:
                        return None
                    self._changed.wait()
                    continue
                best = min(self._entries)
                if best.priority == INTERACTIVE or best.allowed:
                    self._entries.remove(best)
                    self._allowed.discard(best.key)
                    return best
                if not asked:
                    asked = True
                    ask(best.key)
                self._changed.wait()


class LocalLane:
    """The model on a thread of the worker process: `stages.run` answers each microbatch."""

    def __init__(self, stages: Any) -> None:
        self.stages = stages
        self._queue = LaneQueue()
        self._thread: threading.Thread | None = None

    def open(self, events: LaneEvents) -> None:
        self._thread = threading.Thread(target=self._loop, args=(events,), name="ragq-model", daemon=True)
        self._thread.start()

    def submit(self, key: int, priority: int, items: Sequence[Any], prepared: Any) -> None:
        self._queue.put(key, priority, (items, prepared))

    def allow(self, key: int) -> None:
        self._queue.allow(key)

    def stop(self) -> None:
        self._queue.close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self, events: LaneEvents) -> None:
        while True:
            entry = self._queue.take(events.asks)
            if entry is None:
                return
            items, prepared = entry.work
            events.started(entry.key)
            try:
                results: Sequence[Any] = list(self.stages.run(items, prepared))
                if len(results) != len(items):
                    raise RuntimeError(f"{len(results)} results for a microbatch of {len(items)}")
            except BaseException as exc:  # the model's thread must survive anything one microbatch does
                log.exception("microbatch of %d failed", len(items))
                results = [exc] * len(items)
            events.done(entry.key, results)
