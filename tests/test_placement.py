"""Placement: the device settings' spelling, the plan for a machine, and tiny models loaded through the real
`from_pretrained(device_map=...)` path, offloaded in part or whole, answering exactly as a plain load does."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from shared.config import Settings
from shared.devices import DeviceSetting, parse_device, parse_max_memory
from shared.errors import ConfigError
from worker.generation import Generator, load_generator
from worker.placement import input_device, plan_placement, primary_device, report_placement

PROMPTS = ["How do I start ragq?", "What happens when Redis is down and I submit a job with a long question?"]
GREEDY = {"max_new_tokens": 12, "num_beams": 1, "do_sample": False}
GiB = 2**30


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("auto", DeviceSetting("auto")),
        ("cpu", DeviceSetting("cpu")),
        ("mps", DeviceSetting("mps")),
        ("cuda", DeviceSetting("cuda", (0,))),
        ("cuda:3", DeviceSetting("cuda", (3,))),
        ("cuda:0,cuda:1", DeviceSetting("cuda", (0, 1))),
        (" cuda:2 , cuda:0 ", DeviceSetting("cuda", (2, 0))),
    ],
)
def test_every_device_spelling_parses_and_is_accepted_as_a_setting(text: str, expected: DeviceSetting) -> None:
    assert parse_device(text) == expected
    assert parse_device(text).spans == (len(expected.gpus) > 1)
    assert Settings.from_env({"RAGQ_DEVICE": text}).device == text.strip()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tpu", "'tpu' is not a device: use auto, cpu, cuda"),
        ("CPU", "is not a device"),
        ("cuda:", "is not a device"),
        ("cuda:-1", "is not a device"),
        ("cuda:x", "is not a device"),
        ("gpu:0", "is not a device"),
        ("cuda:0,", "is not a device"),
        ("cuda,cuda:1", "'cuda' is not a device.*GPUs only"),
        ("cuda:0,cpu", "'cpu' is not a device.*GPUs only"),
        ("cuda:0,cuda:0", "names a GPU twice"),
    ],
)
def test_bad_device_spellings_are_configuration_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_device(text)
    with pytest.raises(ConfigError, match=f"RAGQ_DEVICE: .*{message}"):
        Settings.from_env({"RAGQ_DEVICE": text})


def test_max_memory_reads_sizes_in_bytes() -> None:
    caps = parse_max_memory("cuda:0=20GiB, cuda:1=1.5GB,cpu=512mib, mps=1000")
    assert caps == {"cuda:0": 20 * GiB, "cuda:1": 1_500_000_000, "cpu": 512 * 2**20, "mps": 1000}
    assert parse_max_memory("") == {}
    settings = Settings.from_env(
        {"RAGQ_DEVICE": "cuda:0,cuda:1", "RAGQ_MAX_MEMORY": "cuda:0=20GiB,cuda:1=20GiB,cpu=64GiB"}
    )
    assert settings.max_memory == "cuda:0=20GiB,cuda:1=20GiB,cpu=64GiB"
    assert Settings.from_env({"RAGQ_MAX_MEMORY": ""}).max_memory is None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RAGQ_MAX_MEMORY": "cpu"}, "RAGQ_MAX_MEMORY: 'cpu' is not device=size"),
        ({"RAGQ_MAX_MEMORY": "cpu=lots"}, "RAGQ_MAX_MEMORY: 'lots' is not a size"),
        ({"RAGQ_MAX_MEMORY": "cpu=1.5"}, "without a unit is whole bytes"),
        ({"RAGQ_MAX_MEMORY": "cuda=1GiB"}, "'cuda' is not a device with a memory budget"),
        ({"RAGQ_MAX_MEMORY": "disk=1GiB"}, "'disk' is not a device with a memory budget"),
        ({"RAGQ_MAX_MEMORY": "cpu=1GiB,cpu=2GiB"}, "cpu is given twice"),
        ({"RAGQ_DEVICE": "cpu", "RAGQ_MAX_MEMORY": "cuda:0=1GiB"}, "gives cuda:0 a budget, but RAGQ_DEVICE=cpu"),
        ({"RAGQ_DEVICE": "cuda:0", "RAGQ_MAX_MEMORY": "cuda:1=1GiB"}, "gives cuda:1 a budget"),
        ({"RAGQ_DEVICE": "cuda:0,cuda:1", "RAGQ_MAX_MEMORY": "cuda:2=1GiB"}, "gives cuda:2 a budget"),
        ({"RAGQ_DEVICE": "mps", "RAGQ_MAX_MEMORY": "cuda:0=1GiB"}, "gives cuda:0 a budget"),
        ({"RAGQ_MAX_MEMORY": "mps=1GiB"}, "gives mps a budget, but RAGQ_DEVICE=auto"),
    ],
)
def test_bad_memory_budgets_are_configuration_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


@pytest.fixture
def four_gpus(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process sees four GPUs with 30 GiB free each (planning only: nothing is allocated)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (30 * GiB, 80 * GiB))
    yield


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_one_device_loads_straight_there_without_accelerate_deciding(no_gpu: None, tmp_path: Path) -> None:
    for device in ("cpu", "auto"):
        placement = plan_placement(device, torch.float32, None, tmp_path)
        assert placement.from_pretrained_kwargs() == {"dtype": torch.float32, "device_map": {"": "cpu"}}
        assert not placement.spread
        assert placement.primary == torch.device("cpu")


def test_a_cpu_budget_lets_accelerate_offload_to_disk_under_the_data_dir(no_gpu: None, tmp_path: Path) -> None:
    kwargs = plan_placement("cpu", torch.float32, "cpu=1GiB", tmp_path).from_pretrained_kwargs()
    assert kwargs["device_map"] == "auto"
    assert kwargs["max_memory"] == {"cpu": GiB}
    assert Path(kwargs["offload_folder"]).parent == tmp_path


def test_a_list_of_gpus_spans_those_and_no_other(four_gpus: None, tmp_path: Path) -> None:
    placement = plan_placement("cuda:2,cuda:0", torch.bfloat16, "cuda:0=20GiB", tmp_path)
    assert placement.spread and placement.device_map == "auto"
    assert placement.primary == torch.device("cuda", 2)
    assert placement.max_memory is not None
    # Named budgets win, the other listed GPU gets its free memory, the CPU takes what does not fit.
    assert {k: v for k, v in placement.max_memory.items() if k != "cpu"} == {2: 30 * GiB, 0: 20 * GiB}
    assert placement.max_memory["cpu"] > 0
    assert placement.from_pretrained_kwargs()["dtype"] == torch.bfloat16


def test_auto_spans_every_gpu_and_lets_accelerate_measure_them(four_gpus: None, tmp_path: Path) -> None:
    placement = plan_placement("auto", torch.bfloat16, None, tmp_path)
    assert placement.device_map == "auto" and placement.max_memory is None
    assert primary_device("auto") == torch.device("cuda", 0)
    capped = plan_placement("auto", torch.bfloat16, "cuda:3=10GiB,cpu=8GiB", tmp_path)
    assert capped.max_memory == {0: 30 * GiB, 1: 30 * GiB, 2: 30 * GiB, 3: 10 * GiB, "cpu": 8 * GiB}


def test_one_named_gpu_holds_the_whole_model(four_gpus: None, tmp_path: Path) -> None:
    placement = plan_placement("cuda:1", torch.bfloat16, None, tmp_path)
    assert placement.device_map == {"": "cuda:1"} and placement.max_memory is None
    offloading = plan_placement("cuda:1", torch.bfloat16, "cpu=4GiB", tmp_path)
    assert offloading.max_memory == {1: 30 * GiB, "cpu": 4 * GiB}


def test_gpus_this_process_cannot_see_are_configuration_errors(no_gpu: None) -> None:
    with pytest.raises(ConfigError, match="names cuda:0, but this process sees 0 GPU"):
        plan_placement("cuda", torch.float32)
    with pytest.raises(ConfigError, match="gives cuda:0 a budget, but this process sees GPUs"):
        plan_placement("auto", torch.float32, "cuda:0=1GiB")


def test_load_generator_refuses_a_bad_device_with_a_configuration_error(tiny_models: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="'tpu' is not a device"):
        load_generator(str(tiny_models["t5"]), device="tpu")


def _weights_bytes(path: Path) -> int:
    return (path / "model.safetensors").stat().st_size


def _same_greedy_steps(plain: Generator, placed: Generator) -> None:
    """Both models take the same greedy steps with the same scores: the offloaded weights are the real ones."""
    inputs = plain.tokenizer([plain.render(p) for p in PROMPTS], return_tensors="pt", padding=True)
    outputs = [
        g.model.generate(
            **inputs.to(g.device),
            **GREEDY,
            pad_token_id=g.tokenizer.pad_token_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
        for g in (plain, placed)
    ]
    assert torch.equal(outputs[0].sequences, outputs[1].sequences)
    for a, b in zip(outputs[0].scores, outputs[1].scores, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("shape", ["t5", "phi3"])
def test_a_model_offloaded_in_part_to_disk_answers_exactly_as_the_plain_load(
    shape: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    path = tiny_models[shape]
    plain = load_generator(str(path), device="cpu")
    # 85% of the weights in CPU memory: accelerate keeps whole blocks there and leaves the rest on disk.
    budget = f"cpu={int(_weights_bytes(path) * 0.85)}"
    placed = load_generator(str(path), device="cpu", max_memory=budget, offload_dir=tmp_path)
    assert placed.placement is not None and placed.placement.spread
    assert set(placed.placement.devices) == {"cpu", "disk"}
    assert any(p.device.type == "meta" for p in placed.model.parameters())
    assert sum(s.parameters for s in placed.placement.devices.values()) == plain.model.num_parameters()
    _same_greedy_steps(plain, placed)
    for params in (GREEDY, {"max_new_tokens": 8}):
        assert [g.token_ids for g in placed.generate(PROMPTS, params)] == [
            g.token_ids for g in plain.generate(PROMPTS, params)
        ]


@pytest.mark.parametrize("shape", ["t5", "phi3"])
def test_a_model_wholly_on_disk_takes_its_inputs_on_the_cpu(
    shape: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    path = tiny_models[shape]
    plain = load_generator(str(path), device="cpu")
    placed = load_generator(str(path), device="cpu", max_memory="cpu=1", offload_dir=tmp_path)
    assert placed.placement is not None and set(placed.placement.devices) == {"disk"}
    # The model's own `.device` is the meta device of its first weight; inputs must go where the hooks run it.
    assert placed.model.device.type == "meta"
    assert placed.device == torch.device("cpu")
    assert [g.token_ids for g in placed.generate(PROMPTS, GREEDY)] == [
        g.token_ids for g in plain.generate(PROMPTS, GREEDY)
    ]


def test_the_report_lists_devices_and_load_time_and_is_logged_in_one_line(
    tiny_models: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="worker.generation"):
        generator = load_generator(str(tiny_models["t5"]), device="cpu")
    report = generator.placement
    assert report is not None
    assert list(report.devices) == ["cpu"] and not report.spread
    share = report.devices["cpu"]
    assert share.parameters == generator.model.num_parameters()
    assert share.bytes >= 4 * share.parameters  # fp32, plus buffers
    assert 0 < report.load_s < 60
    published = json.loads(json.dumps(report.to_dict()))
    assert published["devices"]["cpu"]["parameters"] == share.parameters
    assert published["input_device"] == "cpu"
    lines = [r.getMessage() for r in caplog.records if r.name == "worker.generation" and "loaded" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "cpu " in lines[0] and "inputs on cpu" in lines[0] and "loaded in" in lines[0]


def test_inputs_go_where_the_embeddings_run_when_the_model_is_spread(tiny_models: dict[str, Path]) -> None:
    model = load_generator(str(tiny_models["t5"]), device="cpu").model
    # A map as accelerate writes it for two GPUs (indices) with the embeddings on the second one.
    model.hf_device_map = {"shared": 1, "encoder": 1, "decoder": 0, "lm_head": 0}
    assert input_device(model) == torch.device("cuda", 1)
    report = report_placement(model, 1.0)
    assert list(report.devices) == ["cuda:0", "cuda:1"]
    assert report.devices["cuda:1"].modules == 2 and report.devices["cuda:0"].modules == 2
    # Embeddings offloaded to the CPU run on accelerate's main device, a GPU.
    model.hf_device_map = {"shared": "cpu", "encoder": 0, "decoder": 0, "lm_head": "cpu"}
    assert input_device(model) == torch.device("cuda", 0)
    assert list(report_placement(model, 1.0).devices) == ["cuda:0", "cpu"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", ["t5", "phi3"])
def test_on_one_gpu_a_model_loads_straight_there_or_offloads_what_does_not_fit(
    shape: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    path = tiny_models[shape]
    plain = load_generator(str(path), device="cuda:0", dtype="float32")
    assert plain.placement is not None and list(plain.placement.devices) == ["cuda:0"]
    assert all(p.device == torch.device("cuda", 0) for p in plain.model.parameters())
    half = _weights_bytes(path) // 2
    placed = load_generator(
        str(path), device="cuda:0", dtype="float32", max_memory=f"cuda:0={half},cpu={half // 2}", offload_dir=tmp_path
    )
    assert placed.placement is not None and "cuda:0" in placed.placement.devices and len(placed.placement.devices) > 1
    assert placed.device == torch.device("cuda", 0)
    _same_greedy_steps(plain, placed)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_a_list_of_two_gpus_spreads_one_model_over_both(tiny_models: dict[str, Path]) -> None:
    path = tiny_models["t5"]
    plain = load_generator(str(path), device="cuda:0", dtype="float32")
    half = _weights_bytes(path) // 2
    placed = load_generator(str(path), device="cuda:0,cuda:1", dtype="float32", max_memory=f"cuda:0={half},cpu=0")
    assert placed.placement is not None and {"cuda:0", "cuda:1"} <= set(placed.placement.devices)
    _same_greedy_steps(plain, placed)
