"""`python -m bench.throughput`: what batching buys, and what the queue costs.

On the same questions (the course's questions-dev.csv over the course FAQ), the same model and the same
generation settings (a fixed number of new tokens per question, so runs compare), in one run:

  (a) seed loop        in-process, one question at a time: retrieve -> prompt -> generate
  (b) in-process batch the same pipeline with batch size B: the limit the system can reach
  (c) system           real Redis, the API under gunicorn, one `ragq worker`; all N questions
                       submitted over HTTP and collected with long-polls

Models are random-weight models of a published shape, built here (no download): `tiny`, `t5-small` (CPU),
`flan-t5-xl`, `phi-3-mini` (`--device cuda`, built on the GPU in bf16); or a simulated accelerator
(`worker/simulated.py`): `sim-xl` (FLAN-T5-XL on an H200, in time) and `sim-instant` (no device time: the
bookkeeping ceiling), whose spec directory the benchmark writes and the worker loads like any model. For those it
also reports the device busy fraction (simulated device time / wall time while work is queued) of (b) and (c).
Simulated shapes submit (c) as one batch (backlog items) unless `--submit jobs`.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, Phi3Config, T5Config

from bench.common import Stack, device_busy_s, run_batch
from worker.corpus import load_documents
from worker.generation import Generator, SimulatedGenerator, enable_continuous, load_generator
from worker.pipeline import CallLimits, CallSizeCap, Question, answer, answer_microbatch
from worker.retrieval import Retriever
from worker.simulated import BUILTIN_SPECS, write_spec_dir
from worker.tiny import PHI3_CHAT_TEMPLATE, build_tiny_model, build_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Published shapes (config.json of the Hugging Face checkpoints), with random weights.
T5_SHAPES: dict[str, dict[str, Any]] = {
    "t5-small": dict(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8, feed_forward_proj="relu"),
    "flan-t5-xl": dict(d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32, feed_forward_proj="gated-gelu"),
}
PHI3_SHAPES: dict[str, dict[str, Any]] = {
    "phi-3-mini": dict(
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32
    ),
}
# Simulated accelerators: shape -> built-in spec.
SIM_SHAPES = {"sim-xl": "flan-t5-xl-h200", "sim-instant": "instant"}
SHAPES = ("tiny", *T5_SHAPES, *PHI3_SHAPES, *SIM_SHAPES)
DEFAULTS = {  # shape: (n, batch size, new tokens, padded prompt tokens x beams per generate call)
    "tiny": (64, 16, 16, 1 << 22),
    "t5-small": (256, 16, 32, 1 << 22),
    # Bounded so the KV cache fits: Phi-3 mini keeps about 0.4 MB per token in bf16.
    "flan-t5-xl": (2048, 128, 64, 1 << 17),
    "phi-3-mini": (2048, 128, 64, 1 << 16),
    # 16 generate calls of about 4.1 s: over a minute of simulated device time per run.
    "sim-xl": (2048, 128, 64, 1 << 17),
    "sim-instant": (2048, 128, 64, 1 << 17),
}
# One question at a time costs the simulated H200 about 1.7 s: (a) runs on a few unless --seed-n says otherwise.
SIM_SEED_N = 8
STATS_FILE = "device-calls.jsonl"


def build_model(shape: str, path: Path, device: str, cpu_share: float | None = None) -> Path:
    """Build a random-weight model of `shape` (or write a simulated one's spec) where the worker loads it."""
    if shape in SIM_SHAPES:
        overrides: dict[str, Any] = {"stats_file": STATS_FILE}
        if cpu_share is not None:
            overrides["cpu_share"] = cpu_share
        return write_spec_dir(path, SIM_SHAPES[shape], **overrides)
    if shape == "tiny":
        return build_tiny_model(path, "t5")
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if shape in T5_SHAPES:
        tokenizer = build_tokenizer(add_eos=True)
        config = T5Config(
            vocab_size=32128, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False, **T5_SHAPES[shape]
        )
        # Make the tokenizer's special ids agree with the config's.
        assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 1
        with torch.device(device):
            model = AutoModelForSeq2SeqLM.from_config(config, dtype=dtype)
    else:
        tokenizer = build_tokenizer(add_eos=False)
        tokenizer.chat_template = PHI3_CHAT_TEMPLATE
        tokenizer.model_max_length = 4096
        config = Phi3Config(
            vocab_size=32064,
            max_position_embeddings=4096,
            original_max_position_embeddings=4096,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            **PHI3_SHAPES[shape],
        )
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return path


def load_questions(n: int, data: Path) -> list[Question]:
    with (data / "questions-dev.csv").open() as f:
        rows = list(csv.DictReader(f))
    return [Question(rows[i % len(rows)]["question"], rows[i % len(rows)]["course"]) for i in range(n)]


@dataclass
class Run:
    name: str
    seconds: float
    n: int
    new_tokens: int
    latencies_ms: list[float]
    # Simulated device time while the run lasted (simulated shapes only).
    device_busy_s: float | None = None

    @property
    def device_busy_fraction(self) -> float | None:
        return None if self.device_busy_s is None else self.device_busy_s / self.seconds

    @property
    def qps(self) -> float:
        return self.n / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds

    def percentile(self, p: float) -> float | None:
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_seed_loop(questions: list[Question], retriever: Retriever, generator: Generator, device: str) -> Run:
    started = time.perf_counter()
    tokens = sum(answer(q, retriever, generator).completion_tokens for q in questions)
    sync(device)
    return Run("(a) seed loop, one at a time", time.perf_counter() - started, len(questions), tokens, [])


def run_batched(
    questions: list[Question], retriever: Retriever, generator: Generator, microbatch_size: int, max_microbatch_tokens: int, device: str
) -> Run:
    limits = CallLimits(CallSizeCap(microbatch_size), max_microbatch_tokens)
    busy_before = generator.device_busy_s if isinstance(generator, SimulatedGenerator) else None
    started = time.perf_counter()
    tokens = 0
    for i in range(0, len(questions), microbatch_size):
        for result in answer_microbatch(questions[i : i + microbatch_size], retriever, generator, limits=limits):
            if isinstance(result, Exception):
                raise result
            tokens += result.completion_tokens
    sync(device)
    run = Run(f"(b) in-process, microbatches of {microbatch_size}", time.perf_counter() - started, len(questions), tokens, [])
    if isinstance(generator, SimulatedGenerator) and busy_before is not None:
        run.device_busy_s = generator.device_busy_s - busy_before
    return run


def start_system(work: Path, model: Path, data: Path, env_extra: dict[str, str]) -> Stack:
    """Embedded Redis, one `python -m worker` and the API (gunicorn), as subprocesses, for model `bench`."""
    stack = Stack(
        work,
        RAGQ_MODEL=f"bench={model}",
        RAGQ_DOCUMENTS=str(data / "documents.json"),
        RAGQ_API_THREADS="256",
        **env_extra,
    )
    try:
        # A real model on a GPU may take minutes to load and warm up.
        stack.start_workers(1, "--loglevel", "WARNING", timeout_s=900)
        stack.start_api()
    except RuntimeError:
        stack.close()
        raise
    return stack


def run_system_batch(system: Stack, questions: list[Question], params: dict[str, Any]) -> Run:
    """(c) with the questions submitted as one batch (backlog items), polled until it ends."""
    lines = [{"custom_id": str(i), "question": q.question, "course": q.course, "params": params} for i, q in enumerate(questions)]
    started = time.perf_counter()
    results = run_batch(system.url, lines)
    seconds = time.perf_counter() - started
    failed = [r for r in results if r["status"] != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(results)} batch items did not succeed, e.g. {failed[0]}")
    tokens = sum(r["usage"]["completion_tokens"] for r in results)
    return Run("(c) system: one batch -> Redis -> worker", seconds, len(results), tokens, [])


def run_system(system: Stack, questions: list[Question], params: dict[str, Any], clients: int) -> Run:
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=clients, pool_maxsize=clients)
    session.mount("http://", adapter)

    def submit(q: Question) -> str:
        body = {"question": q.question, "course": q.course, "params": params}
        response = session.post(f"{system.url}/v1/jobs", json=body, timeout=60)
        response.raise_for_status()
        return str(response.json()["id"])

    def collect(job_id: str) -> dict[str, Any]:
        while True:
            job = session.get(f"{system.url}/v1/jobs/{job_id}", params={"wait": 60}, timeout=120).json()
            if job["status"] not in ("queued", "running"):
                return dict(job)

    started = time.perf_counter()
    with ThreadPoolExecutor(16) as submitters, ThreadPoolExecutor(clients) as collectors:
        ids = submitters.map(submit, questions)
        jobs = list(collectors.map(collect, ids))
    seconds = time.perf_counter() - started
    failed = [j for j in jobs if j["status"] != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} jobs did not succeed, e.g. {failed[0]}")
    latencies = [j["timings"]["total_ms"] for j in jobs]
    tokens = sum(j["usage"]["completion_tokens"] for j in jobs)
    sizes = [j["timings"]["microbatch_size"] for j in jobs]
    print(f"    system batch sizes: mean {statistics.mean(sizes):.1f}, max {max(sizes)}", flush=True)
    return Run("(c) system: HTTP -> Redis -> worker", seconds, len(jobs), tokens, latencies)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="t5-small")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--n", type=int, help="questions (default per shape)")
    parser.add_argument("--seed-n", type=int, help="questions for the one-at-a-time loop (default: n)")
    parser.add_argument("--microbatch-size", type=int, help="B (default per shape)")
    parser.add_argument("--max-microbatch-tokens", type=int, help="cap per generate call (default per shape)")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per question, fixed (default per shape)")
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--clients", type=int, default=256, help="concurrent long-polls in (c)")
    parser.add_argument("--skip", default="", help="comma-separated runs to skip: a, b, c")
    parser.add_argument("--cpu-share", type=float, help="simulated shapes: share of each step holding the GIL (0-1)")
    parser.add_argument("--submit", choices=("jobs", "batch"), help="(c) as jobs over HTTP or one batch (default: batch for sim)")
    parser.add_argument("--engine", choices=("process", "thread"), default="process", help="(c): RAGQ_ENGINE of the worker")
    parser.add_argument(
        "--continuous", choices=("auto", "off"), default="auto", help="decoder-only shapes: continuous batching in (b) and (c)"
    )
    parser.add_argument("--data", type=Path, default=DATA, help=f"course data folder (default {DATA})")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    if not (args.data / "questions-dev.csv").exists():
        print(f"bench.throughput needs the course data in {args.data}", file=sys.stderr)
        return 2
    n_default, b_default, t_default, tokens_default = DEFAULTS[args.shape]
    args.max_microbatch_tokens = args.max_microbatch_tokens or tokens_default
    n = args.n or n_default
    microbatch_size = args.microbatch_size or b_default
    new_tokens = args.new_tokens or t_default
    params = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "num_beams": args.num_beams}
    questions = [Question(q.question, q.course, 5, params) for q in load_questions(n, args.data)]
    skip = set(filter(None, args.skip.split(",")))
    simulated = args.shape in SIM_SHAPES
    submit = args.submit or ("batch" if simulated else "jobs")
    cpu_share = None
    if simulated:
        cpu_share = args.cpu_share if args.cpu_share is not None else BUILTIN_SPECS[SIM_SHAPES[args.shape]]["cpu_share"]

    work = Path(tempfile.mkdtemp(prefix="ragq-bench-"))
    print(f"building {args.shape} on {args.device} ...", flush=True)
    model_dir = build_model(args.shape, work / args.shape, args.device, cpu_share)
    retriever = Retriever(load_documents(str(args.data / "documents.json"), work))
    runs: dict[str, Run] = {}
    generator = load_generator(str(model_dir), device=args.device)
    if args.continuous == "auto":
        enable_continuous(generator, 2 * args.max_microbatch_tokens)
    generator.warm_up()
    if "a" not in skip:
        seed_questions = questions[: args.seed_n or (SIM_SEED_N if simulated else n)]
        print(f"(a) seed loop over {len(seed_questions)} ...", flush=True)
        runs["a"] = run_seed_loop(seed_questions, retriever, generator, args.device)
    if "b" not in skip:
        print(f"(b) in-process microbatches of {microbatch_size} over {n} ...", flush=True)
        runs["b"] = run_batched(questions, retriever, generator, microbatch_size, args.max_microbatch_tokens, args.device)
    del generator
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    if "c" not in skip:
        print(f"(c) system over {n} ...", flush=True)
        system = start_system(
            work,
            model_dir,
            args.data,
            {
                "RAGQ_DEVICE": args.device,
                "RAGQ_MAX_BATCH_SIZE": str(microbatch_size),
                "RAGQ_MAX_BATCH_TOKENS": str(args.max_microbatch_tokens),
                "RAGQ_ENGINE": args.engine,
                "RAGQ_CONTINUOUS_BATCHING": args.continuous,
            },
        )
        cpu_ms_per_job: dict[str, float] = {}
        try:
            cpu_before, window_start = system.cpu_s(), time.time()
            if submit == "batch":
                runs["c"] = run_system_batch(system, questions, params)
            else:
                runs["c"] = run_system(system, questions, params, args.clients)
            window_end, cpu_after = time.time(), system.cpu_s()
        finally:
            system.close()
        cpu_ms_per_job = {name: round((cpu_after[name] - cpu_before[name]) * 1000 / n, 2) for name in cpu_before}
        if simulated:
            runs["c"].device_busy_s = device_busy_s(model_dir / STATS_FILE, window_start, window_end)

    print()
    print(f"shape {args.shape}, device {args.device}, n {n}, {new_tokens} new tokens per question, beams {args.num_beams}")
    if simulated:
        print(f"simulated accelerator, cpu_share {cpu_share}, (c) submitted as {submit}, worker engine: {args.engine}")
    print(f"{'run':<38} {'n':>6} {'q/s':>9} {'tok/s':>10} {'p50 ms':>9} {'p95 ms':>9}")
    for run in runs.values():
        p50, p95 = run.percentile(0.5), run.percentile(0.95)
        print(
            f"{run.name:<38} {run.n:>6} {run.qps:>9.2f} {run.tokens_per_s:>10.1f} "
            f"{'' if p50 is None else f'{p50:.0f}':>9} {'' if p95 is None else f'{p95:.0f}':>9}"
        )
    ratios = {}
    if "a" in runs and "b" in runs:
        ratios["b_over_a"] = runs["b"].qps / runs["a"].qps
    if "b" in runs and "c" in runs:
        ratios["c_over_b"] = runs["c"].qps / runs["b"].qps
    busy = {key: run.device_busy_fraction for key, run in runs.items() if run.device_busy_fraction is not None}
    # A model without device time (sim-instant) has no busy fraction to compare.
    if busy.get("b") and "c" in busy:
        ratios["busy_c_over_b"] = busy["c"] / busy["b"]
    for name, value in ratios.items():
        print(f"{name.replace('_over_', '/').replace('_', ' ')}: {value:.3f}")
    for key, fraction in busy.items():
        print(f"device busy fraction ({key}): {fraction:.3f}")
    if "c" in runs:
        print("CPU ms per job in (c): " + ", ".join(f"{name} {ms}" for name, ms in cpu_ms_per_job.items()))
    figures = {
        "shape": args.shape,
        "device": args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name(),
        "n": n,
        "seed_n": runs["a"].n if "a" in runs else None,
        "microbatch_size": microbatch_size,
        "new_tokens": new_tokens,
        "num_beams": args.num_beams,
        "seed_loop_qps": runs["a"].qps if "a" in runs else None,
        "inprocess_batched_qps": runs["b"].qps if "b" in runs else None,
        "system_qps": runs["c"].qps if "c" in runs else None,
        "system_p50_ms": runs["c"].percentile(0.5) if "c" in runs else None,
        "system_p95_ms": runs["c"].percentile(0.95) if "c" in runs else None,
        "seed_loop_tokens_per_s": runs["a"].tokens_per_s if "a" in runs else None,
        "inprocess_batched_tokens_per_s": runs["b"].tokens_per_s if "b" in runs else None,
        "system_tokens_per_s": runs["c"].tokens_per_s if "c" in runs else None,
        "submit": submit,
        "cpu_share": cpu_share,
        "engine": args.engine,
        "continuous": args.continuous,
        "device_busy_fraction": busy.get("c"),
        "inprocess_device_busy_fraction": busy.get("b"),
        "system_cpu_ms_per_job": cpu_ms_per_job if "c" in runs else None,
        **ratios,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
