"""Continuous batching for decoder-only models (Phi-3): greedy answers from transformers' paged-attention manager.

Why: a static microbatch pads every prompt to the longest and runs until its longest answer ends. Continuous batching
(transformers' `ContinuousBatchingManager`, 5.x) packs prompts without padding, retires a sequence as soon as it ends
and admits a waiting one into the freed cache pages. Encoder-decoder models (FLAN-T5) keep static microbatches.

Guarantee: `generate_continuous` returns, per prompt and in input order, the new tokens static greedy `generate` gives
that prompt alone, up to and including the first stop token (tests/test_continuous.py pins it). What would break that
raises `ContinuousUnsupported` before any work, and a failure while generating `ContinuousFailed`: either way the
caller answers with static `generate`.
"""

from __future__ import annotations

import copy
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Self

import torch
from transformers import GenerationConfig, PreTrainedModel

try:  # transformers >= 5 (the config object this module is written against)
    from transformers import ContinuousBatchingConfig
except ImportError:  # pragma: no cover - depends on the installed transformers
    ContinuousBatchingConfig = None

# Tokens per cache page. The library's default (256) suits long chats; RAG answers are short and a request's last
# page is half empty on average, so smaller pages waste less of a cache sized to the workload.
PAGE_SIZE = 64
# Per device type, when the caller gives none: tokens per forward pass (prefill chunks plus one per decoding
# sequence), and sequences per pass. Under sdpa or eager attention every query of a pass is scored against the keys of
# every sequence in it (a block-diagonal mask), so a pass costs sequences x their cached tokens: on a CPU, 8 to 16 at a
# time did best (bench.continuous, tiny shape: all 128 in one pass ran 2 to 3 times slower). The accelerator values
# are unmeasured starting points (flash attention has no such cost); the mask alone is max_batch_tokens x cache floats.
DEFAULTS: dict[str, dict[str, int | None]] = {
    "cpu": {"max_batch_tokens": 512, "max_requests_per_batch": 16},
    "accelerator": {"max_batch_tokens": 2048, "max_requests_per_batch": None},
}
# The attention implementations the manager runs (`eager` it switches to `paged|eager` while it runs).
_ACCEPTED_ATTENTION = {"sdpa", "eager", "paged|eager"}
# Fields of the 5.x `ContinuousBatchingConfig` this module sets; an older shape is not used.
_CONFIG_FIELDS = ("page_size", "num_blocks", "max_batch_tokens", "max_requests_per_batch", "allow_block_sharing")
# Settings static `generate` honours and the manager ignores without a word: such a model would answer differently.
_IGNORED_SETTINGS = ("min_length", "min_new_tokens", "stop_strings", "max_time", "begin_suppress_tokens")


class ContinuousBatchingError(Exception):
    """Base of this module's errors: the caller answers with static `generate` instead."""


class ContinuousUnsupported(ContinuousBatchingError):
    """Continuous batching cannot give static greedy's answers for this model, request or transformers version."""


class ContinuousFailed(ContinuousBatchingError):
    """The manager failed while generating (its loop died, or a request came back with an error)."""


Outcome = list[int] | ContinuousFailed


def unsupported_reason(model: Any) -> str | None:
    """Why continuous batching cannot run `model` here, or None when it can. Never raises."""
    try:
        if getattr(model.config, "is_encoder_decoder", False):
            return "encoder-decoder models are not supported by continuous batching"
        if ContinuousBatchingConfig is None or not all(hasattr(ContinuousBatchingConfig, f) for f in _CONFIG_FIELDS):
            return "the installed transformers has no ContinuousBatchingConfig of the 5.x shape"
        if not callable(getattr(model, "init_continuous_batching", None)):
            return "the model has no init_continuous_batching (transformers too old, or not a generative model)"
        # Packed sequences and the paged cache reach attention through the attention interface; a model that does
        # not dispatch through it would read the packed batch as one long sequence.
        if not getattr(model, "_supports_attention_backend", False):
            return f"{type(model).__name__} does not route attention through transformers' attention interface"
        attention = str(model.config._attn_implementation)
        if attention not in _ACCEPTED_ATTENTION and "flash" not in attention:
            return f"attention implementation {attention!r} is not one continuous batching runs"
        if model.device.type == "cpu":
            from transformers.utils import is_psutil_available

            # On a CPU the manager checks the cache against psutil's memory figures; without psutil it sees 0 bytes.
            if not is_psutil_available():
                return "continuous batching on a CPU needs psutil"
        return None
    except Exception as exc:  # noqa: BLE001 - a model or transformers this module does not know: say no, never fail
        return f"could not inspect the model: {type(exc).__name__}: {exc}"


def supports_continuous(model: Any) -> bool:
    """Whether the installed transformers and this model can run continuous batching. Never raises."""
    return unsupported_reason(model) is None


def greedy_config(model: PreTrainedModel, eos_token_ids: Iterable[int], pad_token_id: int) -> GenerationConfig:
    """The model's generation config made greedy, as static `generate` uses it; `ContinuousUnsupported` when it asks
    for what the manager would silently leave out (minimum lengths, logits processors it does not run)."""
    config = copy.deepcopy(model.generation_config)
    config.update(do_sample=False, num_beams=1, eos_token_id=sorted(eos_token_ids), pad_token_id=pad_token_id)
    ignored = [name for name in _IGNORED_SETTINGS if getattr(config, name, None) not in (None, 0)]
    if ignored:
        raise ContinuousUnsupported(f"generation settings continuous batching ignores: {', '.join(ignored)}")
    try:
        with warnings.catch_warnings():  # it warns that it sees no prompt; the manager makes the very same call
            warnings.simplefilter("ignore")
            processors = model._get_logits_processor(config)
    except Exception as exc:
        raise ContinuousUnsupported(f"logits processors could not be built: {exc}") from exc
    dropped = [type(p).__name__ for p in processors if getattr(p, "supports_continuous_batching", None) is not True]
    if dropped:
        raise ContinuousUnsupported(f"logits processors continuous batching does not run: {', '.join(dropped)}")
    return config


class ContinuousSession:
    """A long-lived manager: requests go in as they arrive, finished answers come out, the cache stays allocated.

    The cache holds `cache_tokens` (rounded up to pages) for all requests in flight; a request that cannot fit even
    alone is refused at `submit`. When the cache is full the manager evicts a request and later prefills its prompt
    and answer so far again (the same tokens, summed in another order). One collector at a time (`collect` and `wait`
    share one queue); one session per model at a time (an eager model runs as `paged|eager` until `stop`).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        eos_token_ids: set[int],
        pad_token_id: int,
        cache_tokens: int,
        max_batch_tokens: int | None = None,
        max_requests_per_batch: int | None = None,
        page_size: int = PAGE_SIZE,
        prefix_sharing: bool = True,
    ) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ContinuousUnsupported(reason)
        self.model = model
        self.eos_token_ids = sorted(eos_token_ids)
        self.generation_config = greedy_config(model, eos_token_ids, pad_token_id)
        pages = max(1, -(-cache_tokens // page_size))
        self.cache_tokens = pages * page_size
        defaults = DEFAULTS["cpu" if model.device.type == "cpu" else "accelerator"]
        self.batching_config = ContinuousBatchingConfig(
            page_size=page_size,
            num_blocks=pages,
            max_batch_tokens=max_batch_tokens or defaults["max_batch_tokens"],
            max_requests_per_batch=max_requests_per_batch or defaults["max_requests_per_batch"],
            # Prompts that start alike (chat template, RAG instructions) share those full pages of cache.
            allow_block_sharing=prefix_sharing,
            # Keep the model's own attention: flash attention would be faster on a GPU but would no longer give
            # static `generate`'s answers. Load the model with flash attention to have both paths use it.
            auto_switch_to_flash=False,
            # Decoding sequences first, new prompts fill the rest of each pass: answers in flight finish soonest.
            scheduler_type="fifo",
        )
        self._manager: Any = None
        self._pending: set[str] = set()
        self._finished: dict[str, Outcome] = {}
        self._lock = threading.Lock()
        self._counter = 0

    def start(self) -> None:
        """Build the manager, allocate its cache here (so a cache that does not fit fails now), start its thread."""
        attention = self.model.config._attn_implementation
        with torch.inference_mode():  # the loop's thread takes the caller's mode
            try:
                manager = self.model.init_continuous_batching(
                    generation_config=self.generation_config, continuous_batching_config=self.batching_config
                )
                manager.warmup()  # creates the cache; on a CPU nothing else (no graphs to capture)
            except (MemoryError, ValueError, TypeError, RuntimeError) as exc:
                self.model.set_attn_implementation(attention)  # the manager may have switched it already
                raise ContinuousUnsupported(f"continuous batching could not start: {exc}") from exc
            manager.start()
        self._manager = manager

    def submit(self, prompt_ids: Sequence[int], *, max_new_tokens: int, request_id: str | None = None) -> str:
        """Queue one prompt (token ids, rendered as for static `generate`); returns its request id."""
        if self._manager is None:
            raise ContinuousFailed("the session is not started")
        if not prompt_ids or max_new_tokens < 1 or len(prompt_ids) + max_new_tokens > self.cache_tokens:
            raise ContinuousUnsupported(f"{len(prompt_ids)} prompt + {max_new_tokens} new tokens: not 1 or more of "
                                        f"each, or they do not fit a cache of {self.cache_tokens}")  # fmt: skip
        with self._lock:
            if request_id is None:
                request_id, self._counter = f"request-{self._counter}", self._counter + 1
            if request_id in self._pending or request_id in self._finished:
                raise ValueError(f"request id {request_id!r} is already in this session")
            self._pending.add(request_id)
        accepted = self._manager.add_request(
            list(prompt_ids), request_id=request_id, max_new_tokens=max_new_tokens, eos_token_id=self.eos_token_ids
        )
        if accepted is None:
            with self._lock:
                self._pending.discard(request_id)
            raise ContinuousFailed("the manager no longer accepts requests (stopping, or its loop died)")
        return request_id

    def collect(self, timeout_s: float = 0.0) -> dict[str, Outcome]:
        """Every request finished since the last call, waiting up to `timeout_s` for one when none has."""
        self._drain(timeout_s)
        with self._lock:
            finished, self._finished = self._finished, {}
        return finished

    def wait(self, request_ids: Iterable[str], timeout_s: float | None = None) -> dict[str, Outcome]:
        """Wait until all of `request_ids` have finished; their outcomes (the others stay for `collect`)."""
        wanted = set(request_ids)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            with self._lock:
                if wanted <= self._finished.keys():
                    return {rid: self._finished.pop(rid) for rid in wanted}
            if deadline is not None and time.monotonic() >= deadline:
                raise ContinuousFailed(f"{len(wanted - self._finished.keys())} requests unfinished after {timeout_s} s")
            self._drain(0.1)

    def stop(self, *, cancel_pending: bool = False) -> None:
        """Stop the loop (after the requests in flight finish, unless `cancel_pending`), free the cache, restore the
        model's attention implementation."""
        manager, self._manager = self._manager, None
        if manager is not None:
            manager.stop(block=True, hard_stop=cancel_pending)
            manager.destroy()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop(cancel_pending=exc_info[0] is not None)

    def _drain(self, timeout_s: float) -> None:
        """Move the manager's finished results into `_finished`; `ContinuousFailed` when its loop died meanwhile."""
        manager = self._manager
        if manager is None:
            raise ContinuousFailed("the session is not started")
        result = manager.get_result(timeout=timeout_s)
        while result is not None:
            if result.is_finished():
                outcome: Outcome = list(result.generated_tokens)
                if result.error is not None:
                    outcome = ContinuousFailed(f"{result.request_id}: {result.error}")
                with self._lock:
                    self._pending.discard(result.request_id)
                    self._finished[result.request_id] = outcome
            result = manager.get_result(timeout=0)
        # A dead loop fails its requests on the queue first: read those before calling the rest lost.
        if self._pending and not manager.is_running() and manager.output_router.output_queue.empty():
            error = manager.background_thread_status.fatal_error
            raise ContinuousFailed(f"the generation loop stopped with {len(self._pending)} requests pending: {error}")


def generate_continuous(
    model: PreTrainedModel,
    prompts_ids: list[list[int]],
    *,
    max_new_tokens: int,
    eos_token_ids: set[int],
    pad_token_id: int,
    max_batch_tokens: int | None = None,
    max_requests_per_batch: int | None = None,
    page_size: int = PAGE_SIZE,
    prefix_sharing: bool = True,
    timeout_s: float | None = None,
) -> list[list[int]]:
    """Greedy answers by continuous batching: per prompt, in input order, the new tokens static greedy `generate` gives
    it alone, the first stop token included. `ContinuousUnsupported` (nothing run) or `ContinuousFailed`: answer
    with static `generate` instead. `pad_token_id` only completes the generation config; nothing is padded."""
    if not prompts_ids:
        return []
    # A cache for the whole workload at once, so no request is ever evicted and prefilled again: at most a page per
    # prompt more than the padded static call it replaces holds (every row: the longest prompt plus max_new_tokens).
    cache_tokens = sum(-(-(len(p) + max_new_tokens) // page_size) * page_size for p in prompts_ids)
    session = ContinuousSession(
        model, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, cache_tokens=cache_tokens, page_size=page_size,
        max_batch_tokens=max_batch_tokens, max_requests_per_batch=max_requests_per_batch, prefix_sharing=prefix_sharing,
    )  # fmt: skip
    with session:
        ids = [session.submit(p, max_new_tokens=max_new_tokens, request_id=str(i)) for i, p in enumerate(prompts_ids)]
        outcomes = session.wait(ids, timeout_s)
    failures = [o for o in outcomes.values() if isinstance(o, ContinuousFailed)]
    if failures:
        raise ContinuousFailed(f"{len(failures)} of {len(ids)} requests failed; first: {failures[0]}")
    return [outcomes[rid] for rid in ids]  # type: ignore[misc]
