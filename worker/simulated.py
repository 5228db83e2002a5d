"""A simulated accelerator: a model whose `generate` takes the time a GPU would, on any machine, with checkable output.

Selected like any model: `RAGQ_MODEL=sim:flan-t5-xl-h200` (a built-in spec), `sim:instant` (no device time at
all: the bookkeeping ceiling), or a local directory holding `ragq-sim.json` (fields below; `"base"` names a
built-in spec to start from). `worker.generation.SimulatedGenerator` is the family; this module holds the spec,
the time model, the device's accounting and the deterministic answers, and imports nothing of `generation`.

Time model. A `generate` call of B prompts padded to L tokens, with `num_beams` = K (S = B·K sequences), that
produces T new tokens (the longest answer of the call) runs a prefill, then T decode steps:

    prefill_s = prefill_base_ms + prefill_per_token_ms · B · L                      (the encoder, once)
    step_s(t) = step_base_ms + step_per_seq_ms · S + step_per_ctx_token_ms · S · (L + t),   t = 0 … T-1

The device is busy for each part's whole time. The host's share of each part, `cpu_share` of it, is spent first
in a pure-Python loop holding the GIL (kernel launches, and the Python of `generate`, overlap the device's work on
a GPU), counted in this thread's CPU time, so a GIL or cores taken by other threads stretch it; the rest of the
part the host waits in `time.sleep`, GIL released, as it waits on a GPU. A part ends when both the device's time
and the host's share are over: a starved host starves the device, as launch-bound PyTorch code does. Parts are
laid end to end on nominal times, so late wake-ups from `sleep` do not add up over a call.

The device's busy time (the sum of the parts' nominal times) is kept on the object; with `stats_file` set, each
call appends `{"start", "end", "device_s", "batch", "new_tokens"}` (wall-clock seconds) as one JSON line, so a
benchmark can compute the device busy fraction of another process.

Calibration of `flan-t5-xl-h200` on the two H200 figures of docs/benchmarks.md (FLAN-T5-XL's shape in bf16,
64 new tokens, greedy, prompts of up to 512 tokens): in-process microbatches of 128 ran 31.2 q/s (4.1 s each),
one question at a time 0.60 q/s (1.67 s each). The spec gives a call of B = 128, L = 512, T = 64 a prefill of
0.33 s (about 184 TFLOP of encoder work at a little over half the H200's bf16 peak) and 64 steps of 58.7 ms on
average: 4.10 s; a call of B = 1, L = 350 (a typical single prompt) 1.65 s, nearly all of it the fixed 25.5 ms per step that an
eager, launch-bound decode step costs at any batch size. The host's prompt building is taken as nil in both
(fast host; unmeasured).
`cpu_share` 0.2: of a 59 ms eager decode step (24 decoder layers, about 1,000 kernels, logits processors, a host
sync per step), PyTorch releases the GIL inside its C++ ops and while it waits on the device; the interpreted
Python around them (module calls, cache updates, the generation loop) is estimated at 10-15 ms. An estimate, not
a measurement: benchmarks also report runs at 0.

Answers. The tokens of a prompt's answer are drawn from a generator seeded by a hash of the rendered prompt
(word tokens of the tokenizer): its natural length lies in [answer_min_tokens, answer_max_tokens], ending with
`</s>`; `min_new_tokens` holds the stop back, `max_new_tokens` cuts the answer. Equal prompts get equal answers
in any call; sampling settings change nothing (the sim is always greedy).

Fault injection: with `crash_marker` set, a call with a prompt holding that text SIGKILLs its own process (the
engine process, or the worker when the model runs in-process), every time: a poison input.

Limits: no memory model (no out-of-memory at any size), beams cost as independent sequences, one family only
(an encoder-decoder's prompt budget and defaults), no speed-up from shorter prompts inside a padded call.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerFast

from worker.tiny import build_tokenizer

SOURCE_PREFIX = "sim:"
SPEC_FILE = "ragq-sim.json"

BUILTIN_SPECS: dict[str, dict[str, Any]] = {
    "flan-t5-xl-h200": {
        "context_tokens": 512,
        "cpu_share": 0.2,
        "prefill_base_ms": 5.0,
        "prefill_per_token_ms": 0.005,
        "step_base_ms": 25.5,
        "step_per_seq_ms": 0.1,
        "step_per_ctx_token_ms": 0.000295,
        "answer_min_tokens": 8,
        "answer_max_tokens": 48,
    },
    "instant": {
        "context_tokens": 512,
        "cpu_share": 0.0,
        "prefill_base_ms": 0.0,
        "prefill_per_token_ms": 0.0,
        "step_base_ms": 0.0,
        "step_per_seq_ms": 0.0,
        "step_per_ctx_token_ms": 0.0,
        "answer_min_tokens": 8,
        "answer_max_tokens": 48,
    },
}


OPTIONAL_FIELDS = ("stats_file", "crash_marker")


@dataclass(frozen=True)
class SimSpec:
    """What a simulated model is: its limits, its time model (see the module docstring), its answers."""

    name: str
    context_tokens: int
    cpu_share: float
    prefill_base_ms: float
    prefill_per_token_ms: float
    step_base_ms: float
    step_per_seq_ms: float
    step_per_ctx_token_ms: float
    answer_min_tokens: int
    answer_max_tokens: int
    stats_file: str | None = None
    # Fault injection (tests, bench.chaos): a call whose prompt holds this text kills the process running the
    # simulated device with SIGKILL, as a CUDA error or the out-of-memory killer would kill a real one.
    crash_marker: str | None = None

    @classmethod
    def from_fields(cls, name: str, values: dict[str, Any]) -> SimSpec:
        """A spec from JSON-like fields; unknown, missing or out-of-range fields raise `ValueError`."""
        known = {f.name for f in fields(cls)} - {"name"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown simulated-model fields {unknown}; known: {sorted(known)}")
        missing = sorted(f.name for f in fields(cls) if f.name in known and f.name not in OPTIONAL_FIELDS and f.name not in values)
        if missing:
            raise ValueError(f"simulated model {name!r} lacks fields {missing}")
        spec = cls(
            name=name,
            context_tokens=int(values["context_tokens"]),
            cpu_share=float(values["cpu_share"]),
            **{key: float(values[key]) for key in known if key.endswith("_ms")},
            answer_min_tokens=int(values["answer_min_tokens"]),
            answer_max_tokens=int(values["answer_max_tokens"]),
            stats_file=None if values.get("stats_file") is None else str(values["stats_file"]),
            crash_marker=None if values.get("crash_marker") is None else str(values["crash_marker"]),
        )
        if not 0.0 <= spec.cpu_share <= 1.0:
            raise ValueError(f"cpu_share must lie in [0, 1], not {spec.cpu_share}")
        if spec.context_tokens < 1 or not 1 <= spec.answer_min_tokens <= spec.answer_max_tokens:
            raise ValueError("need context_tokens >= 1 and 1 <= answer_min_tokens <= answer_max_tokens")
        if any(getattr(spec, key) < 0 for key in known if key.endswith("_ms")):
            raise ValueError("times must not be negative")
        return spec

    def prefill_s(self, batch: int, padded_tokens: int) -> float:
        """Device time of the prefill of `batch` prompts padded to `padded_tokens`."""
        return (self.prefill_base_ms + self.prefill_per_token_ms * batch * padded_tokens) / 1000

    def step_s(self, sequences: int, context_tokens: int) -> float:
        """Device time of one decode step of `sequences` sequences, each attending to `context_tokens` tokens."""
        return (
            self.step_base_ms + self.step_per_seq_ms * sequences + self.step_per_ctx_token_ms * sequences * context_tokens
        ) / 1000

    def part_times_s(self, batch: int, padded_tokens: int, new_tokens: int, beams: int = 1) -> list[float]:
        """Device time of each part of one call: the prefill, then one per decode step."""
        sequences = batch * beams
        steps = [self.step_s(sequences, padded_tokens + t) for t in range(new_tokens)]
        return [self.prefill_s(batch, padded_tokens), *steps]

    def call_s(self, batch: int, padded_tokens: int, new_tokens: int, beams: int = 1) -> float:
        """Device time of one `generate` call of these shapes."""
        return sum(self.part_times_s(batch, padded_tokens, new_tokens, beams))


def is_simulated(source: str) -> bool:
    """Whether `source` names a simulated model: `sim:NAME` or a directory holding `ragq-sim.json`."""
    return source.startswith(SOURCE_PREFIX) or (Path(source) / SPEC_FILE).is_file()


def load_spec(source: str) -> SimSpec:
    """The spec `source` names; `ValueError` says why there is none. A relative `stats_file` is the directory's."""
    if source.startswith(SOURCE_PREFIX):
        name = source[len(SOURCE_PREFIX) :]
        if name not in BUILTIN_SPECS:
            raise ValueError(f"no built-in simulated model {name!r}; built-in: {sorted(BUILTIN_SPECS)}")
        return SimSpec.from_fields(name, BUILTIN_SPECS[name])
    directory = Path(source)
    try:
        values = json.loads((directory / SPEC_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {directory / SPEC_FILE}: {exc}") from exc
    if not isinstance(values, dict):
        raise ValueError(f"{directory / SPEC_FILE} must hold a JSON object")  # noqa: TRY004 (callers catch ValueError)
    base = values.pop("base", None)
    if base is not None:
        if base not in BUILTIN_SPECS:
            raise ValueError(f"base {base!r} is not a built-in simulated model; built-in: {sorted(BUILTIN_SPECS)}")
        values = {**BUILTIN_SPECS[base], **values}
    spec = SimSpec.from_fields(directory.resolve().name, values)
    if spec.stats_file is not None and not Path(spec.stats_file).is_absolute():
        spec = replace(spec, stats_file=str(directory.resolve() / spec.stats_file))
    return spec


def write_spec_dir(directory: Path, base: str, **overrides: Any) -> Path:
    """Write a spec directory: built-in spec `base` with `overrides` (for benchmarks and tests)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SPEC_FILE).write_text(json.dumps({"base": base, **overrides}, indent=2) + "\n", encoding="utf-8")
    return directory


def spec_problem(source: str) -> str | None:
    """Why the simulated model `source` cannot be had, or None."""
    try:
        load_spec(source)
    except ValueError as exc:
        return str(exc)
    return None


def build_sim_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny models' T5-like tokenizer (about 20 ms to train, the same vocabulary in every process)."""
    return build_tokenizer(add_eos=True)


def hold_gil_for(cpu_s: float) -> None:
    """Run pure Python until this thread has spent `cpu_s` of CPU time: it holds the GIL all along, as interpreted
    code does (other threads get it only at the interpreter's switch interval)."""
    target = time.thread_time() + cpu_s
    while time.thread_time() < target:
        pass


class SimulatedDevice:
    """Spends the time of `generate` calls as the spec says and keeps account of the device's busy time."""

    def __init__(self, spec: SimSpec) -> None:
        self.spec = spec
        self.busy_s = 0.0
        self.calls = 0

    def run(self, batch: int, padded_tokens: int, new_tokens: int, beams: int = 1) -> float:
        """Spend one call's time (prefill, then `new_tokens` steps); returns the device time it took."""
        started_wall = time.time()
        parts = self.spec.part_times_s(batch, padded_tokens, new_tokens, beams)
        part_start = time.perf_counter()
        for part_s in parts:
            if part_s <= 0:
                continue
            hold_gil_for(part_s * self.spec.cpu_share)
            host_done = time.perf_counter()
            part_end = max(part_start + part_s, host_done)
            if part_end > host_done:
                time.sleep(part_end - host_done)
            part_start = part_end
        device_s = sum(parts)
        self.busy_s += device_s
        self.calls += 1
        if self.spec.stats_file is not None:
            line = {"start": started_wall, "end": time.time(), "device_s": device_s, "batch": batch, "new_tokens": new_tokens}
            with open(self.spec.stats_file, "a", encoding="utf-8") as out:
                out.write(json.dumps(line) + "\n")
        return device_s


class AnswerMaker:
    """Deterministic answers: token ids from a hash of the rendered prompt, cut as generation settings say."""

    def __init__(self, spec: SimSpec, tokenizer: PreTrainedTokenizerFast) -> None:
        self.spec = spec
        self.eos_id = int(tokenizer.eos_token_id)
        # Word tokens (a space, then letters) decode to readable gibberish; sorted, so the list is the same everywhere.
        vocab = tokenizer.get_vocab()
        self.word_ids = sorted(i for token, i in vocab.items() if token.startswith("Ġ") and token[1:].isalpha())

    def tokens(self, rendered_prompt: str, params: dict[str, Any]) -> list[int]:
        """The answer's token ids: up to and including `</s>` where it ends, or cut at `max_new_tokens`."""
        seed = int.from_bytes(hashlib.sha256(rendered_prompt.encode("utf-8")).digest()[:8], "big")
        draw = random.Random(seed)
        natural = draw.randint(self.spec.answer_min_tokens, self.spec.answer_max_tokens)
        end = max(natural, int(params.get("min_new_tokens") or 0))
        produced = min(end, int(params["max_new_tokens"]))
        words = [draw.choice(self.word_ids) for _ in range(produced)]
        return words[: produced - 1] + [self.eos_id] if produced == end else words
