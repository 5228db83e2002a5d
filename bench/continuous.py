"""`python -m bench.continuous`: static microbatches against continuous batching, greedy, on a tiny Phi-3.

The same prompts (a shared 48-token instruction, then a tail of 8 to 40 tokens for three prompts in four and of 300
to 500 for the fourth: short questions and long contexts mixed), the same model, the same max_new_tokens:

  static-16, static-32  left-padded batched `model.generate`, calls of 16 or 32 prompts in arrival order (what
                        `ChatGenerator.generate` runs), answers cut after their first eos
  continuous            `worker.continuous.generate_continuous` over all prompts, with its defaults
  continuous-all        the same with every prompt in one pass (transformers' own default for max_requests_per_batch)

Shapes: `tiny` is worker/tiny.py's Phi-3 (hidden 64, 2 layers: per-step overheads only); `small` is the same config
widened (hidden 512, 4 layers, random weights, built in memory), where compute, and so padding, counts.

A random model would almost never emit its eos, so every answer would run to the limit and static calls would lose
nothing to finished rows. With `--eos emitted` (the default) the eos is the token found in most answers of a first
greedy pass, so answers end at mixed lengths as real ones do; `--eos config` keeps the model's own. Each run is timed
`--repeats` times, the best kept; `--threads` is 1 by default because on a busy 2-core machine two OpenMP threads made
the same static run take anywhere from 3 to 90 s. Reported per run: prompts, tokens generated, seconds, tokens/s, their
ratio to static-16's, and how many answers equal static-16's token for token.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from worker.continuous import generate_continuous, unsupported_reason
from worker.tiny import build_tiny_model

PREFIX_TOKENS = 48
STATIC_SIZES = (16, 32)
SMALL = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4}
SMALL |= {"num_attention_heads": 8, "num_key_value_heads": 8}


def load_model(shape: str) -> PreTrainedModel:
    """The tiny Phi-3, built to a temporary folder and loaded back; for `small`, its config widened."""
    with tempfile.TemporaryDirectory() as root:
        path = build_tiny_model(Path(root) / "phi3", "phi3")
        if shape == "tiny":
            return AutoModelForCausalLM.from_pretrained(path).eval()
        config = AutoConfig.from_pretrained(path)
    config.update(SMALL)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def mixed_prompts(n: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """`n` prompts of token ids: a shared prefix, then a short tail (3 in 4) or a long one (1 in 4)."""
    rng = random.Random(seed)
    prefix = [rng.randrange(10, vocab_size) for _ in range(PREFIX_TOKENS)]
    tails = [rng.randint(300, 500) if i % 4 == 3 else rng.randint(8, 40) for i in range(n)]
    return [prefix + [rng.randrange(10, vocab_size) for _ in range(t)] for t in tails]


def until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """The tokens up to and including the first eos."""
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1]
    return tokens


@torch.inference_mode()
def static_answers(
    model: PreTrainedModel, prompts: list[list[int]], size: int, max_new_tokens: int, eos: set[int], pad: int
) -> list[list[int]]:
    """Greedy answers from left-padded `generate` calls of `size` prompts, cut after their first eos."""
    answers: list[list[int]] = []
    for start in range(0, len(prompts), size):
        call = prompts[start : start + size]
        width = max(len(p) for p in call)
        output = model.generate(
            input_ids=torch.tensor([[pad] * (width - len(p)) + p for p in call]),
            attention_mask=torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in call]),
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            eos_token_id=sorted(eos),
            pad_token_id=pad,
        )
        answers += [until_eos(row, eos) for row in output[:, width:].tolist()]
    return answers


def emitted_eos(model: PreTrainedModel, prompts: list[list[int]], max_new_tokens: int, pad: int) -> int:
    """The token found in most answers of a first greedy pass: as eos, it ends answers at mixed lengths."""
    own = {int(model.generation_config.eos_token_id)}
    answers = static_answers(model, prompts[:16], 16, max_new_tokens, own, pad)
    return Counter(t for answer in answers for t in set(answer)).most_common(1)[0][0]


def best_of(repeats: int, run: Callable[[], list[list[int]]]) -> tuple[list[list[int]], float]:
    """The answers of `run()` and its fastest time in seconds over `repeats` runs."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        answers = run()
        seconds.append(time.perf_counter() - started)
    return answers, min(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=128, help="prompts (default 128)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="max_new_tokens (default 64)")
    parser.add_argument("--shape", choices=("tiny", "small"), default="tiny", help="see above (default tiny)")
    parser.add_argument("--eos", choices=("emitted", "config"), default="emitted", help="see above (default emitted)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row, best kept (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see above)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.shape)
    reason = unsupported_reason(model)
    if reason is not None:
        parser.exit(2, f"continuous batching is not available: {reason}\n")
    prompts = mixed_prompts(args.prompts, model.config.vocab_size)
    pad, new = int(model.config.pad_token_id), args.max_new_tokens
    eos = {int(model.generation_config.eos_token_id)}
    if args.eos == "emitted":
        eos = {emitted_eos(model, prompts, new, pad)}
    static_answers(model, prompts[:4], 4, 4, eos, pad)  # warm-up: first calls pay for lazy set-up
    runs: dict[str, Callable[[], list[list[int]]]] = {
        f"static-{size}": lambda size=size: static_answers(model, prompts, size, new, eos, pad) for size in STATIC_SIZES
    }
    runs["continuous"] = lambda: generate_continuous(
        model, prompts, max_new_tokens=new, eos_token_ids=eos, pad_token_id=pad
    )
    runs["continuous-all"] = lambda: generate_continuous(
        model, prompts, max_new_tokens=new, eos_token_ids=eos, pad_token_id=pad, max_requests_per_batch=len(prompts)
    )
    results = {name: best_of(args.repeats, run) for name, run in runs.items()}
    reference, base_seconds = results[f"static-{STATIC_SIZES[0]}"]
    base_rate = sum(map(len, reference)) / base_seconds
    figures: dict[str, Any] = {
        "shape": args.shape,
        "prompts": args.prompts,
        "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))],
        "max_new_tokens": new,
        "eos": args.eos,
        "answers_ended_by_eos": sum(bool(a) and a[-1] in eos for a in reference),
        "threads": args.threads,
        "repeats": args.repeats,
        "runs": [],
    }
    print(f"shape {args.shape}, {args.prompts} prompts of {figures['prompt_tokens'][0]}-{figures['prompt_tokens'][1]} "
          f"tokens, max_new_tokens {new}, eos {args.eos} ({figures['answers_ended_by_eos']} answers end at it), "
          f"{args.threads} thread(s), best of {args.repeats}")  # fmt: skip
    print(f"{'run':<15} {'prompts':>7} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'ratio':>6}  equal to static-16")
    for name, (answers, seconds) in results.items():
        tokens = sum(map(len, answers))
        rate = tokens / seconds
        equal = sum(a == b for a, b in zip(answers, reference, strict=True))
        row = {"run": name, "prompts": len(answers), "tokens": tokens, "seconds": round(seconds, 3)}
        row |= {"tokens_per_s": round(rate, 1), "ratio": round(rate / base_rate, 2), "equal_to_static_16": equal}
        figures["runs"].append(row)
        print(f"{name:<15} {len(answers):>7} {tokens:>7} {seconds:>8.2f} {rate:>8.1f} {rate / base_rate:>6.2f}  "
              f"{equal}/{len(answers)}")  # fmt: skip
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
