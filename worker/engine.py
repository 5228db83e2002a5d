"""The model's lane in a process of its own (`RAGQ_ENGINE=process`, the default): the worker's side.

The worker process keeps everything but the model: consuming, claiming, statuses, retrieval, prompts, storing
results. `EngineLane` sends each prepared microbatch to the engine process (`worker.engine_process`) as plain
requests, at once, so that the next one waits inside the engine while the current one runs, and turns what
comes back into the jobs' answers. Why a process: the model's thread no longer shares the worker's GIL with
hundreds of task threads, and a crash of the model (a CUDA error, the out-of-memory killer) no longer takes the
worker, its Redis connections and its jobs with it. Why a pipe (`multiprocessing` connections): one reader and
one writer on each side, messages of a few hundred kilobytes at most (prompts in, token ids and text out), a few
per second; a pipe costs well under a millisecond each and needs no dependency (see docs/design.md).

When the engine dies, the reader notices at once (the pipe closes) and starts a new engine. Nothing is failed
for it: microbatches that had not started go to the new engine as they were; the one that was running is
split in two halves, each sent again, so that an input that crashes the engine every time is cornered in
log2(n) restarts and failed alone (`EngineCrash`) once it has crashed the engine twice, the last time alone.
Every other job of its microbatch is answered, once. If a new engine cannot start `START_ATTEMPTS` times in a
row, the worker exits: its supervisor restarts it, and its jobs go to other workers (`worker.liveness`).

An engine that stays alive but stops answering (a deadlocked kernel, a stuck driver call) would hold every later
microbatch for ever. A microbatch part running longer than `hang_after_s` (the task time limit: by then every
job in it has timed out) is taken as hung: the engine is killed and started again, the hung part's jobs get
`EngineHung` (not sent again: their tasks have given up), and everything else goes to the new engine.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from shared.errors import ModelLoadError
from worker import metrics as worker_metrics
from worker.engine_process import EngineCrash, EngineHung, EngineOptions, serve
from worker.lane import INTERACTIVE, LaneEvents

log = logging.getLogger(__name__)

# Consecutive failed starts after which the worker gives up and exits.
START_ATTEMPTS = 3
# A model that takes longer than this to load and warm up is taken as hung.
START_TIMEOUT_S = 1800.0
EXIT_ENGINE_LOST = 70
# How often the reader looks at the running part's age while the engine says nothing.
HANG_CHECK_S = 1.0


@dataclass
class _Part:
    """Some of a microbatch's requests, as the engine knows them: the whole microbatch, or a half of a half…"""

    microbatch: int
    priority: int
    indices: list[int]
    crashes: int = 0
    allowed: bool = False


@dataclass
class _Microbatch:
    """A microbatch in the engine: what the answerer launched, and the results gathered from its parts."""

    items: Sequence[Any]
    launch: Any
    results: list[Any]
    parts_left: int = 1
    started_at: float | None = None


@dataclass
class _Engine:
    process: Any
    conn: Connection
    info: dict[str, Any] = field(default_factory=dict)


class EngineLane:
    """The lane of `worker.lane` backed by an engine process: starts it, feeds it, restarts it when it dies."""

    def __init__(
        self,
        answerer: Any,
        options: EngineOptions,
        on_fatal: Callable[[str], None] | None = None,
        hang_after_s: float | None = None,
    ) -> None:
        self.answerer = answerer
        self.options = options
        self.on_fatal = on_fatal or _exit_worker
        self.hang_after_s = hang_after_s
        self.restarts = 0
        self.hangs = 0
        self._events: LaneEvents | None = None
        self._lock = threading.RLock()
        self._engine: _Engine | None = None
        self._microbatches: dict[int, _Microbatch] = {}
        self._parts: dict[int, _Part] = {}
        self._part_ids = itertools.count()
        self._running_part: int | None = None
        self._running_since = 0.0
        self._hung_part: int | None = None
        self._stopping = False
        self._reader: threading.Thread | None = None

    # -- the engine process ------------------------------------------------------------------------------

    def start(self) -> dict[str, Any]:
        """Start the engine and wait until its model is loaded and warm; `ModelLoadError` if it cannot be."""
        self._engine = self._spawn()
        return self._engine.info

    @property
    def pid(self) -> int | None:
        """The engine process's pid (changes when it is restarted)."""
        engine = self._engine
        return None if engine is None else engine.process.pid

    @property
    def info(self) -> dict[str, Any]:
        """What the current engine said when it was ready: pid, device, placement, load time."""
        engine = self._engine
        return {} if engine is None else engine.info

    @property
    def state(self) -> str:
        """`starting` until the first engine is ready, `restarting` while a dead one is replaced, else `ready`."""
        engine = self._engine
        if engine is None:
            return "starting"
        return "ready" if engine.process.is_alive() else "restarting"

    @property
    def running(self) -> bool:
        """Whether a microbatch is on the model now."""
        return self._running_part is not None

    def _spawn(self) -> _Engine:
        context = multiprocessing.get_context("spawn")
        parent_end, child_end = context.Pipe()
        process = context.Process(target=serve, args=(child_end, self.options), name="ragq-engine", daemon=True)
        process.start()
        # Only the engine holds its end now: when it dies, reading ours fails at once.
        child_end.close()
        if not parent_end.poll(START_TIMEOUT_S):
            process.kill()
            raise ModelLoadError(f"the engine did not load model {self.options.source!r} within {START_TIMEOUT_S:.0f} s")
        try:
            message = parent_end.recv()
        except (EOFError, OSError):
            process.join(timeout=5)
            raise ModelLoadError(f"the engine died loading model {self.options.source!r} (exit code {process.exitcode})") from None
        if message[0] != "ready":
            process.join(timeout=30)
            raise ModelLoadError(f"model {self.options.source!r} could not be loaded: {message[1]}")
        log.info("engine process %d ready: %s", process.pid, message[1])
        return _Engine(process, parent_end, message[1])

    # -- the lane ------------------------------------------------------------------------------------------

    def open(self, events: LaneEvents) -> None:
        if self._engine is None:
            self.start()
        self._events = events
        self._reader = threading.Thread(target=self._read_loop, name="ragq-engine-results", daemon=True)
        self._reader.start()

    def submit(self, key: int, priority: int, items: Sequence[Any], prepared: Any) -> None:
        launch = self.answerer.launch(items, prepared)
        with self._lock:
            self._microbatches[key] = _Microbatch(items, launch, [None] * len(launch.requests))
            if not launch.requests:
                # Nothing left for the model (all cancelled, or none prepared): answer without it.
                self._microbatches[key].parts_left = 0
            else:
                part = _Part(key, priority, list(range(len(launch.requests))), allowed=priority == INTERACTIVE)
                self._send_part(self._new_part(part))
        if not launch.requests:
            self._finish(key)

    def allow(self, key: int) -> None:
        with self._lock:
            for part_id, part in self._parts.items():
                if part.microbatch == key and not part.allowed:
                    part.allowed = True
                    self._send(("allow", part_id))

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            engine = self._engine
            if engine is not None:
                self._send(("stop",))
        if engine is not None:
            engine.process.join(timeout=30)
            if engine.process.is_alive():
                engine.process.kill()
        if self._reader is not None:
            self._reader.join(timeout=5)

    def _new_part(self, part: _Part) -> int:
        part_id = next(self._part_ids)
        self._parts[part_id] = part
        return part_id

    def _send_part(self, part_id: int) -> None:
        part = self._parts[part_id]
        launch = self._microbatches[part.microbatch].launch
        self._send(("run", part_id, part.priority, [launch.requests[i] for i in part.indices]))
        if part.allowed and part.priority != INTERACTIVE:
            self._send(("allow", part_id))

    def _send(self, message: tuple[Any, ...]) -> None:
        """Send, under the lock; a dead engine is noticed by the reader, which sends everything again."""
        engine = self._engine
        if engine is None:
            return
        try:
            engine.conn.send(message)
        except (BrokenPipeError, OSError):
            pass

    # -- what the engine says ------------------------------------------------------------------------------

    def _read_loop(self) -> None:
        while True:
            engine = self._engine
            assert engine is not None and self._events is not None
            try:
                if self.hang_after_s is not None:
                    self._kill_if_hung(engine)
                    if not engine.conn.poll(min(HANG_CHECK_S, self.hang_after_s)):
                        continue
                message = engine.conn.recv()
            except (EOFError, OSError):
                if self._stopping:
                    return
                if not self._restart(engine):
                    return
                continue
            kind = message[0]
            if kind == "ask":
                part = self._parts.get(message[1])
                if part is not None:
                    self._events.asks(part.microbatch)
            elif kind == "started":
                self._on_started(message[1])
            elif kind == "done":
                self._on_done(message[1], message[2])

    def _kill_if_hung(self, engine: _Engine) -> None:
        with self._lock:
            part_id = self._running_part
            if part_id is None or self._hung_part is not None or self.hang_after_s is None:
                return
            running_s = time.monotonic() - self._running_since
            if running_s < self.hang_after_s:
                return
            self._hung_part = part_id
            self.hangs += 1
        log.error(
            "engine process %s ran one microbatch for %.0f s (limit %.0f s): taken as hung, killing it",
            engine.process.pid, running_s, self.hang_after_s,
        )
        # The reader then sees the pipe close and restarts it, as after any death.
        engine.process.kill()

    def _on_started(self, part_id: int) -> None:
        with self._lock:
            self._running_part = part_id
            self._running_since = time.monotonic()
            part = self._parts[part_id]
            microbatch = self._microbatches[part.microbatch]
            first = microbatch.started_at is None
            if first:
                microbatch.started_at = time.monotonic()
        if first:
            assert self._events is not None
            self._events.started(part.microbatch)

    def _on_done(self, part_id: int, results: list[Any]) -> None:
        with self._lock:
            self._running_part = None
            part = self._parts.pop(part_id)
            microbatch = self._microbatches[part.microbatch]
            for i, result in zip(part.indices, results, strict=True):
                microbatch.results[i] = result
            microbatch.parts_left -= 1
            finished = microbatch.parts_left == 0
        if finished:
            self._finish(part.microbatch)

    def _finish(self, key: int) -> None:
        with self._lock:
            microbatch = self._microbatches.pop(key)
        started_at = microbatch.started_at or time.monotonic()
        try:
            results = self.answerer.finish(microbatch.items, microbatch.launch, microbatch.results, started_at)
        except Exception as exc:  # the reader thread must survive anything one microbatch does
            log.exception("finishing microbatch %d failed", key)
            results = [exc] * len(microbatch.items)
        assert self._events is not None
        self._events.done(key, results)

    # -- when the engine dies ------------------------------------------------------------------------------

    def _restart(self, dead: _Engine) -> bool:
        """Start a new engine and give it everything the dead one held; False when the worker must exit."""
        dead.process.join(timeout=5)
        log.error("engine process %s died (exit code %s); starting a new one", dead.process.pid, dead.process.exitcode)
        answered = self._corner_the_crash()
        for key in answered:
            self._finish(key)
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                engine = self._spawn()
                break
            except ModelLoadError as exc:
                log.error("engine start %d of %d failed: %s", attempt, START_ATTEMPTS, exc.message)
        else:
            self.on_fatal(f"the engine could not be started again {START_ATTEMPTS} times")
            return False
        with self._lock:
            self.restarts += 1
            worker_metrics.engine_restarted()
            self._engine = engine
            # Interactive first, the microbatch that was running before the others, then in the order they came.
            for part_id in sorted(self._parts, key=self._resend_order):
                self._send_part(part_id)
        return True

    def _resend_order(self, part_id: int) -> tuple[int, bool, int]:
        part = self._parts[part_id]
        return part.priority, self._microbatches[part.microbatch].started_at is None, part_id

    def _corner_the_crash(self) -> list[int]:
        """Split the part that was running when the engine died; fail a job that crashed it twice, alone.
        Returns the microbatches now complete."""
        with self._lock:
            part_id, self._running_part = self._running_part, None
            hung, self._hung_part = self._hung_part, None
            if part_id is None:
                return []
            part = self._parts.pop(part_id)
            if hung == part_id:
                # Not split and sent again like a crash: its jobs' tasks stopped waiting at the same limit.
                microbatch = self._microbatches[part.microbatch]
                for i in part.indices:
                    microbatch.results[i] = EngineHung(
                        f"the model's engine ran this job's microbatch longer than {self.hang_after_s:.0f} s; "
                        "it was restarted and the job not retried"
                    )
                microbatch.parts_left -= 1
                return [part.microbatch] if microbatch.parts_left == 0 else []
            crashes = part.crashes + 1
            if len(part.indices) > 1:
                middle = len(part.indices) // 2
                for half in (part.indices[:middle], part.indices[middle:]):
                    # Already allowed: it was running.
                    self._new_part(_Part(part.microbatch, part.priority, half, crashes, allowed=True))
                self._microbatches[part.microbatch].parts_left += 1
                return []
            if crashes < 2:
                self._new_part(_Part(part.microbatch, part.priority, part.indices, crashes, allowed=True))
                return []
            microbatch = self._microbatches[part.microbatch]
            microbatch.results[part.indices[0]] = EngineCrash(
                f"the model's engine process died each time it ran this job ({crashes} times, the last time alone); not retried"
            )
            log.error("a job of microbatch %d crashed the engine %d times; failing it alone", part.microbatch, crashes)
            microbatch.parts_left -= 1
            return [part.microbatch] if microbatch.parts_left == 0 else []


def _exit_worker(reason: str) -> None:
    """Leave at once, acknowledging nothing: the supervisor starts the worker again, other workers take its jobs."""
    log.critical("ragq worker exiting: %s", reason)
    logging.shutdown()
    os._exit(EXIT_ENGINE_LOST)
