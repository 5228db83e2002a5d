import re
from pathlib import Path

import pytest

from shared.broker import make_celery
from shared.config import Settings
from shared.errors import ConfigError
from shared.models import ModelSpec

README = Path(__file__).resolve().parents[1] / "README.md"


def test_defaults_without_environment() -> None:
    settings = Settings.from_env({})
    assert settings.default_model == ModelSpec("flan-t5-base", "google/flan-t5-base")
    assert settings.redis_url is None
    assert settings.result_ttl_s == 7 * 24 * 3600
    assert settings.model_names == ["flan-t5-base"]


def test_models_parse_aliases_ids_and_directories() -> None:
    settings = Settings.from_env(
        {"RAGQ_MODEL": "/models/my-t5/", "RAGQ_MODELS": "phi=phi-3-mini-4k, big=google/flan-t5-xl"}
    )
    assert settings.default_model == ModelSpec("my-t5", "/models/my-t5/")
    assert settings.extra_models == (
        ModelSpec("phi", "microsoft/Phi-3-mini-4k-instruct"),
        ModelSpec("big", "google/flan-t5-xl"),
    )


def test_unknown_ragq_variable_is_rejected() -> None:
    with pytest.raises(ConfigError, match="RAGQ_MODLE"):
        Settings.from_env({"RAGQ_MODLE": "x"})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RAGQ_PORT": "eighty"}, "RAGQ_PORT"),
        ({"RAGQ_PORT": "70000"}, "between 1 and 65535"),
        ({"RAGQ_MAX_NEW_TOKENS": "0"}, "RAGQ_MAX_NEW_TOKENS"),
        ({"RAGQ_DEVICE": "tpu"}, "RAGQ_DEVICE"),
        ({"RAGQ_DTYPE": "int8"}, "RAGQ_DTYPE"),
        ({"RAGQ_FALLBACK_TINY_MODEL": "maybe"}, "RAGQ_FALLBACK_TINY_MODEL"),
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL"),
        ({"RAGQ_MODELS": "a=x,a=y"}, "repeats a model name"),
        ({"RAGQ_MODELS": "bad name=x"}, "model name"),
        ({"RAGQ_WORKER_MODEL": "ghost"}, "not served"),
        ({"RAGQ_CALLBACK_DEADLINE_S": "0.5"}, "between 1 and 120"),
        ({"RAGQ_CALLBACK_DEADLINE_S": "inf"}, "finite"),
        ({"RAGQ_CALLBACK_DEADLINE_S": "soon"}, "RAGQ_CALLBACK_DEADLINE_S"),
        ({"RAGQ_CALLBACK_CA_FILE": "/nonexistent/ca.pem"}, "cannot read it"),
    ],
)
def test_bad_values_are_rejected_with_the_variable_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_fractional_settings_parse_as_numbers() -> None:
    assert Settings.from_env({"RAGQ_CALLBACK_DEADLINE_S": "2.5"}).callback_deadline_s == 2.5
    assert Settings.from_env({}).callback_deadline_s == 10.0


def test_task_time_limit_must_be_below_visibility_timeout() -> None:
    with pytest.raises(ConfigError, match="must be below"):
        Settings.from_env({"RAGQ_TASK_TIME_LIMIT_S": "3600", "RAGQ_VISIBILITY_TIMEOUT_S": "3600"})


def test_celery_visibility_timeout_outlasts_task_time_limit() -> None:
    settings = Settings.from_env({})
    conf = make_celery(settings).conf
    assert conf.broker_transport_options["visibility_timeout"] > conf.task_time_limit
    assert conf.task_soft_time_limit < conf.task_time_limit


def test_celery_accepts_json_only_and_acknowledges_late() -> None:
    conf = make_celery(Settings.from_env({})).conf
    assert conf.accept_content == ["json"]
    assert conf.task_serializer == "json"
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1


def test_settings_survive_the_round_trip_through_a_child_environment() -> None:
    settings = Settings.from_env({"RAGQ_MODELS": "phi=phi-3-mini-4k", "RAGQ_PORT": "9000", "REDIS_URL": "redis://h:1/0"})
    assert Settings.from_env(settings.to_env()) == settings


def test_readme_documents_every_setting() -> None:
    text = README.read_text()
    missing = [row[0] for row in Settings.documented() if not re.search(rf"`{row[0]}`", text)]
    assert missing == []
