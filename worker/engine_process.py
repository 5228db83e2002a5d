"""The engine process: the model, alone in a process of its own, running the microbatches the worker sends it.

Started by `worker.engine.EngineLane` with multiprocessing's `spawn` (a fresh interpreter: CUDA is initialised
here and only here, and nothing forks after it). It loads the model, warms it up, says `ready`, then runs what
arrives on its end of the pipe. A reader thread takes messages off the pipe at once, so the next microbatch
is in the engine before the current one ends; the main thread only runs the model. The order is the lane's
(`worker.lane.LaneQueue`): interactive first, a backlog microbatch once the worker has allowed it.

Messages (tuples, pickled by `multiprocessing.connection` between these two processes only):

    worker -> engine   ("run", part, priority, [GenerateRequest, ...])   ("allow", part)   ("stop",)
    engine -> worker   ("ready", info)   ("failed", message)   ("ask", part)   ("started", part)
                       ("done", part, [Generated | Exception, ...])

When the worker goes away (its end of the pipe closes), the engine finishes what it holds and exits.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from multiprocessing.connection import Connection
from typing import Any

from worker.generation import GenerationError, enable_continuous, load_generator
from worker.lane import LaneQueue
from worker.pipeline import CallLimits, CallSizeCap, Generated, generate_requests

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineOptions:
    """What the engine needs to load and run the model (sent to the spawned process, so plain values only)."""

    source: str
    label: str
    device: str
    dtype: str
    max_input_tokens: int | None
    max_call_size: int
    max_call_tokens: int
    log_level: str = "INFO"
    # Placement across devices (`worker.placement`): RAGQ_MAX_MEMORY, and where offloaded weights go.
    max_memory: str | None = None
    offload_dir: str | None = None
    # RAGQ_CONTINUOUS_BATCHING: for decoder-only models, with a paged cache of this many tokens.
    continuous: bool = False
    continuous_cache_tokens: int = 1 << 16


class EngineCrash(GenerationError):
    """The engine process died every time it ran this job: its input is taken to crash the model."""


class EngineHung(GenerationError):
    """The engine ran this job's microbatch past the hang limit and was killed (raised in the worker only)."""


def portable(result: Generated | BaseException) -> Generated | BaseException:
    """A result that unpickles in the worker: our own error types as they are, any other one as its text (a CUDA
    or library exception may not pickle, or need imports the worker lacks)."""
    if isinstance(result, BaseException) and type(result) not in (GenerationError, EngineCrash):
        return RuntimeError(f"{type(result).__name__}: {result}")
    return result


def serve(conn: Connection, options: EngineOptions) -> None:
    """The engine process's main function."""
    # The worker decides when the engine ends (`stop`, or its end of the pipe closing): a SIGTERM or Ctrl-C sent
    # to the whole process group must not kill the engine under a worker that is finishing its jobs.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=options.log_level, format="[%(asctime)s: %(levelname)s/engine %(process)d] %(message)s")
    started = time.monotonic()
    try:
        generator = load_generator(
            options.source,
            device=options.device,
            dtype=options.dtype,
            label=options.label,
            max_input_tokens=options.max_input_tokens,
            max_memory=options.max_memory,
            offload_dir=None if options.offload_dir is None else Path(options.offload_dir),
        )
        if options.continuous:
            enable_continuous(generator, options.continuous_cache_tokens)
        generator.warm_up()
    except BaseException as exc:  # the worker reports it and exits: a model that cannot load is a configuration error
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    info = {"pid": os.getpid(), "label": generator.label, "device": str(generator.device), "load_s": round(time.monotonic() - started, 3)}
    info["continuous_batching"] = getattr(generator, "continuous", False)
    if generator.placement is not None:
        info["placement"] = generator.placement.to_dict()
    conn.send(("ready", info))
    log.info("engine ready: %s on %s, loaded in %.1f s", generator.label, generator.device, info["load_s"])
    lane = LaneQueue()
    threading.Thread(target=_read, args=(conn, lane), name="ragq-engine-reader", daemon=True).start()
    limits = CallLimits(CallSizeCap(options.max_call_size), options.max_call_tokens)
    try:
        while True:
            entry = lane.take(lambda part: conn.send(("ask", part)))
            if entry is None:
                return
            conn.send(("started", entry.key))
            try:
                results: list[Any] = list(generate_requests(entry.work, generator, limits))
            except Exception as exc:  # one microbatch's failure fails its jobs, not the engine
                log.exception("microbatch of %d failed", len(entry.work))
                results = [exc] * len(entry.work)
            conn.send(("done", entry.key, [portable(r) for r in results]))
    except (BrokenPipeError, EOFError, OSError):
        log.info("the worker went away; engine stopping")


def _read(conn: Connection, lane: LaneQueue) -> None:
    """Move messages from the pipe into the lane as they come; close the lane when the worker stops or goes."""
    try:
        while True:
            message = conn.recv()
            kind = message[0]
            if kind == "run":
                _, part, priority, requests = message
                lane.put(part, priority, requests)
            elif kind == "allow":
                lane.allow(message[1])
            elif kind == "stop":
                break
    except (EOFError, OSError):
        pass
    lane.close()
