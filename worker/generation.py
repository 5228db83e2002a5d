"""Resident models: load once, warm up, generate. Families are chosen from the model's config, not its name."""

from __future__ import annotations

import copy
import logging
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from shared.errors import ModelLoadError
from worker.placement import PlacementReport, input_device, load_placed, plan_placement, primary_device
from worker.continuous import ContinuousFailed, ContinuousSession, ContinuousUnsupported, unsupported_reason
from worker.simulated import AnswerMaker, SimSpec, SimulatedDevice, build_sim_tokenizer, is_simulated, load_spec

log = logging.getLogger(__name__)

# Tokenizers without a real limit report a huge sentinel as model_max_length.
_UNSET_MAX_LENGTH = 1_000_000
SAMPLING_PARAMS = ("temperature", "top_p", "top_k")


class GenerationError(Exception):
    """Generation for one job could not be done (for example: its prompt is longer than the model accepts)."""


@dataclass(frozen=True)
class Generation:
    """One generated answer and its token counts."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: tuple[int, ...] = ()


class Generator:
    """A loaded model and tokenizer of one family."""

    family: ClassVar[str]
    auto_class: ClassVar[type]
    defaults: ClassVar[dict[str, Any]]
    padding_side: ClassVar[str]
    # Where `load_generator` put the model (`worker.placement`); None for a generator built otherwise.
    placement: PlacementReport | None = None

    def __init__(
        self,
        model: PreTrainedModel | None,
        tokenizer: PreTrainedTokenizerBase,
        label: str,
        max_input_tokens: int | None = None,
        config: Any = None,
    ) -> None:
        # Without a model (`load_preparing`: the worker process when the engine process holds the model) the
        # generator only counts tokens and builds prompts.
        self.model = model
        self.config = config if config is not None else model.config  # type: ignore[union-attr]
        self.tokenizer = tokenizer
        self.label = label
        self.max_input_tokens = max_input_tokens
        self.tokenizer.padding_side = self.padding_side
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @property
    def device(self) -> torch.device:
        """Where inputs go: the model's device, or its input embeddings' when accelerate spread it."""
        return input_device(self.model)

    def for_preparing(self) -> Generator:
        """This generator for another thread that only prepares prompts (counts tokens, never generates): same
        family, limits and tokenizer settings, but a tokenizer of its own. A Rust tokenizer is not safe to share
        between threads: `generate`'s padded calls switch padding on and off on it, and a count made meanwhile
        on another thread comes back padded (or a call fails)."""
        preparing = copy.copy(self)
        preparing.tokenizer = copy.deepcopy(self.tokenizer)
        return preparing

    @property
    def context_tokens(self) -> int:
        """The longest input the model takes, lowered to `max_input_tokens` when that is set."""
        limit = self.tokenizer.model_max_length
        if not limit or limit >= _UNSET_MAX_LENGTH:
            limit = getattr(self.config, "max_position_embeddings", None) or 512
        if self.max_input_tokens is not None:
            limit = min(limit, self.max_input_tokens)
        return int(limit)

    def effective_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """The family's defaults overlaid with the job's params; sampling knobs dropped when not sampling."""
        merged = {**self.defaults, **params}
        if not merged.get("do_sample"):
            for name in SAMPLING_PARAMS:
                merged.pop(name, None)
        return merged

    def prompt_budget(self, params: dict[str, Any]) -> int:
        """Tokens the prompt may take."""
        return self.context_tokens

    def render(self, prompt: str) -> str:
        """The prompt as the model reads it."""
        return prompt

    def count_tokens(self, prompt: str) -> int:
        """Tokens of `prompt` once rendered for the model."""
        return self.count_tokens_many([prompt])[0]

    def count_tokens_many(self, prompts: Sequence[str]) -> list[int]:
        """Tokens of each prompt once rendered for the model, in one call (the Rust tokenizer works in parallel)."""
        if not prompts:
            return []
        rendered = [self.render(prompt) for prompt in prompts]
        return [len(ids) for ids in self.tokenizer(rendered, add_special_tokens=self._add_special_tokens).input_ids]

    def count_text_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text as a piece of a prompt: not rendered, no special tokens; in one call."""
        if not texts:
            return []
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False).input_ids]

    _add_special_tokens: ClassVar[bool] = True

    @torch.inference_mode()
    def generate(self, prompts: list[str], params: dict[str, Any]) -> list[Generation]:
        """Answer `prompts` in one `generate` call with the same `params`."""
        effective = self.effective_params(params)
        rendered = [self.render(p) for p in prompts]
        inputs = self.tokenizer(
            rendered, return_tensors="pt", padding=True, add_special_tokens=self._add_special_tokens
        ).to(self.device)
        prompt_lengths = inputs.attention_mask.sum(dim=1).tolist()
        budget = self.prompt_budget(effective)
        for length in prompt_lengths:
            if length > budget:
                raise GenerationError(f"prompt is {length} tokens; this model takes at most {budget}")
        output = self.model.generate(
            **inputs, pad_token_id=self.tokenizer.pad_token_id, **effective
        )
        new_tokens = self._new_tokens(output, inputs.input_ids.shape[1])
        stop_ids = self._stop_ids()
        results = []
        for row, prompt_tokens in zip(new_tokens, prompt_lengths, strict=True):
            completion = _until_stop(row.tolist(), stop_ids)
            text = self.tokenizer.decode(completion, skip_special_tokens=True).strip()
            results.append(Generation(text, int(prompt_tokens), len(completion), tuple(completion)))
        return results

    def _new_tokens(self, output: torch.Tensor, input_length: int) -> torch.Tensor:
        raise NotImplementedError

    def _stop_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return set(eos) if isinstance(eos, list) else {eos}

    def warm_up(self) -> None:
        """One short generate call, so the first job does not pay for lazy initialisation."""
        self.generate(["warm-up"], {"max_new_tokens": 2, "num_beams": 1})


class Seq2SeqGenerator(Generator):
    """Encoder-decoder models such as FLAN-T5; defaults from the course's `llm()`."""

    family = "encoder-decoder"
    auto_class = AutoModelForSeq2SeqLM
    defaults = {"num_beams": 5, "max_new_tokens": 100, "do_sample": False}
    padding_side = "right"

    def _new_tokens(self, output: torch.Tensor, input_length: int) -> torch.Tensor:
        # The decoder's output starts with its start token (the pad token for T5), never generated.
        return output[:, 1:]


class ChatGenerator(Generator):
    """Decoder-only chat models such as Phi-3 mini: chat template, greedy, only new tokens decoded."""

    family = "decoder-only"
    auto_class = AutoModelForCausalLM
    defaults = {"num_beams": 1, "max_new_tokens": 500, "do_sample": False}
    # Left padding keeps every prompt's last token next to its first generated one.
    padding_side = "left"
    # The chat template already holds the special tokens the model expects.
    _add_special_tokens = False

    def render(self, prompt: str) -> str:
        if self.tokenizer.chat_template is None:
            return prompt
        return str(
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        )

    def prompt_budget(self, params: dict[str, Any]) -> int:
        # Prompt and answer share the context window.
        return self.context_tokens - int(self.effective_params(params)["max_new_tokens"])

    def _new_tokens(self, output: torch.Tensor, input_length: int) -> torch.Tensor:
        return output[:, input_length:]

    # Continuous batching (`worker.continuous`, RAGQ_CONTINUOUS_BATCHING): on for greedy calls when the loader
    # says so and transformers can run this model; the session (and its paged cache) stays for the next call.
    continuous: bool = False
    continuous_cache_tokens: int = 1 << 16
    _session: ContinuousSession | None = None

    def generate(self, prompts: list[str], params: dict[str, Any]) -> list[Generation]:
        """Greedy calls by continuous batching where it runs (the same tokens as static `generate`), else static."""
        effective = self.effective_params(params)
        if self.continuous and _plain_greedy(effective):
            try:
                return self._generate_continuous(prompts, effective)
            except ContinuousUnsupported as exc:
                log.info("continuous batching not used for this call: %s", exc)
            except ContinuousFailed as exc:
                log.warning("continuous batching failed (%s); answering with static generate", exc)
                self._stop_session()
        else:
            # The manager switches the model's attention while it runs: static `generate` needs it back.
            self._stop_session()
        return super().generate(prompts, params)

    @torch.inference_mode()
    def _generate_continuous(self, prompts: list[str], effective: dict[str, Any]) -> list[Generation]:
        rendered = [self.render(p) for p in prompts]
        ids = self.tokenizer(rendered, add_special_tokens=self._add_special_tokens).input_ids
        budget = self.prompt_budget(effective)
        for prompt_ids in ids:
            if len(prompt_ids) > budget:
                raise GenerationError(f"prompt is {len(prompt_ids)} tokens; this model takes at most {budget}")
        if self._session is None:
            assert self.model is not None
            session = ContinuousSession(
                self.model,
                eos_token_ids=self._stop_ids(),
                pad_token_id=int(self.tokenizer.pad_token_id),
                cache_tokens=self.continuous_cache_tokens,
            )
            session.start()
            self._session = session
        max_new = int(effective["max_new_tokens"])
        if any(len(p) + max_new > self._session.cache_tokens for p in ids):
            # Checked before any is submitted, so none is left behind in the session.
            raise ContinuousUnsupported(f"a prompt and its {max_new} new tokens do not fit the cache of {self._session.cache_tokens}")
        requests = [self._session.submit(p, max_new_tokens=max_new) for p in ids]
        outcomes = self._session.wait(requests)
        results = []
        stop_ids = self._stop_ids()
        for prompt_ids, request in zip(ids, requests, strict=True):
            outcome = outcomes[request]
            if isinstance(outcome, ContinuousFailed):
                raise outcome
            completion = _until_stop(list(outcome), stop_ids)
            text = self.tokenizer.decode(completion, skip_special_tokens=True).strip()
            results.append(Generation(text, len(prompt_ids), len(completion), tuple(completion)))
        return results

    def _stop_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.stop()


def enable_continuous(generator: Generator, cache_tokens: int) -> bool:
    """Turn continuous batching on for a decoder-only model transformers can run it for; whether it is on."""
    if not isinstance(generator, ChatGenerator) or generator.model is None:
        return False
    reason = unsupported_reason(generator.model)
    if reason is not None:
        log.info("continuous batching off for %s: %s", generator.label, reason)
        return False
    generator.continuous = True
    generator.continuous_cache_tokens = cache_tokens
    return True


def _plain_greedy(effective: dict[str, Any]) -> bool:
    """Settings continuous batching answers exactly as static greedy `generate` does."""
    return (
        set(effective) <= {"num_beams", "max_new_tokens", "do_sample"}
        and int(effective.get("num_beams", 1)) == 1
        and not effective.get("do_sample")
    )


class SimulatedGenerator(Seq2SeqGenerator):
    """The simulated accelerator (`worker/simulated.py`): an encoder-decoder's interface, a GPU's time, checkable answers.

    It lives here, not in `worker.simulated`, so that `load_generator` can build it without an import cycle.
    """

    family = "simulated"

    def __init__(self, spec: SimSpec, tokenizer: PreTrainedTokenizerBase, label: str, max_input_tokens: int | None = None) -> None:
        # No model object: the spec stands for it.
        self.spec = spec
        self.simulated_device = SimulatedDevice(spec)
        self.answers = AnswerMaker(spec, tokenizer)
        self.tokenizer = tokenizer
        self.label = label
        self.max_input_tokens = max_input_tokens
        self.tokenizer.padding_side = self.padding_side

    @property
    def device(self) -> torch.device:
        # The simulation runs on the host.
        return torch.device("cpu")

    @property
    def context_tokens(self) -> int:
        """The spec's input limit, lowered to `max_input_tokens` when that is set."""
        if self.max_input_tokens is None:
            return self.spec.context_tokens
        return min(self.spec.context_tokens, self.max_input_tokens)

    @property
    def device_busy_s(self) -> float:
        """Seconds the simulated device has been busy since loading (warm-up included)."""
        return self.simulated_device.busy_s

    def generate(self, prompts: list[str], params: dict[str, Any]) -> list[Generation]:
        """Answer `prompts` in one simulated call: tokenize, check budgets, spend the spec's time, decode."""
        effective = self.effective_params(params)
        rendered = [self.render(p) for p in prompts]
        lengths = [len(ids) for ids in self.tokenizer(rendered, add_special_tokens=self._add_special_tokens).input_ids]
        budget = self.prompt_budget(effective)
        for length in lengths:
            if length > budget:
                raise GenerationError(f"prompt is {length} tokens; this model takes at most {budget}")
        if self.spec.crash_marker is not None and any(self.spec.crash_marker in text for text in rendered):
            os.kill(os.getpid(), signal.SIGKILL)
        completions = [self.answers.tokens(text, effective) for text in rendered]
        beams = int(effective.get("num_beams", 1))
        self.simulated_device.run(len(prompts), max(lengths), max(len(c) for c in completions), beams)
        return [
            Generation(self.tokenizer.decode(c, skip_special_tokens=True).strip(), length, len(c), tuple(c))
            for c, length in zip(completions, lengths, strict=True)
        ]

    def _stop_ids(self) -> set[int]:
        return {self.answers.eos_id}


def load_simulated(source: str, label: str | None = None, max_input_tokens: int | None = None) -> SimulatedGenerator:
    """Load a simulated model (`sim:NAME` or a spec directory; see `worker/simulated.py`)."""
    try:
        spec = load_spec(source)
    except ValueError as exc:
        raise ModelLoadError(f"model {source!r} could not be loaded: {exc}") from exc
    log.info("loaded simulated model %s (%s)", source, spec)
    return SimulatedGenerator(spec, build_sim_tokenizer(), label or source, max_input_tokens)


def load_preparing(source: str, *, label: str | None = None, max_input_tokens: int | None = None) -> Generator:
    """A generator without weights, for the worker process when the engine process holds the model: the model's
    config and tokenizer, to count tokens and build prompts exactly as the model will read them."""
    if is_simulated(source):
        return load_simulated(source, label, max_input_tokens)
    try:
        config = AutoConfig.from_pretrained(source)
        family = FAMILIES[family_of(config)]
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"model {source!r} could not be loaded: {exc}") from exc
    return family(None, tokenizer, label or source, max_input_tokens, config=config)


def _until_stop(tokens: list[int], stop_ids: set[int]) -> list[int]:
    """The generated tokens up to and including the first stop token; what follows is padding of the `generate` call.

    Padding cannot be told apart by id: a model may generate the pad token itself.
    """
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: i + 1]
    return tokens


FAMILIES: dict[str, type[Generator]] = {cls.family: cls for cls in (Seq2SeqGenerator, ChatGenerator)}


def family_of(config: Any) -> str:
    """The family a model belongs to, read from its config."""
    return "encoder-decoder" if getattr(config, "is_encoder_decoder", False) else "decoder-only"


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when present, else the CPU; a list of GPUs, its first."""
    return primary_device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on CUDA (halves memory, same range as fp32) and fp32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_generator(
    source: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    label: str | None = None,
    max_input_tokens: int | None = None,
    max_memory: str | None = None,
    offload_dir: Path | None = None,
) -> Generator:
    """Load a model from a Hugging Face id or local directory with `from_pretrained`, or a simulated one.

    The weights go straight to their device(s) (`worker.placement`): one device, or spread by accelerate within
    `max_memory` (`RAGQ_MAX_MEMORY`), offloading to the CPU and then to disk under `offload_dir`.
    """
    if is_simulated(source):
        return load_simulated(source, label, max_input_tokens)
    try:
        config = AutoConfig.from_pretrained(source)
        family = FAMILIES[family_of(config)]
        torch_device = resolve_device(device)
        placement = plan_placement(device, resolve_dtype(dtype, torch_device), max_memory, offload_dir)
        tokenizer = AutoTokenizer.from_pretrained(source)
        model, report = load_placed(family.auto_class, source, placement)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"model {source!r} could not be loaded: {exc}") from exc
    model.eval()
    log.info("loaded %s (%s): %s", source, family.family, report.summary())
    generator = family(model, tokenizer, label or source, max_input_tokens)
    generator.placement = report
    return generator
