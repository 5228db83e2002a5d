from shared import keys


def test_job_key_format() -> None:
    assert keys.job("abc") == "ragq:job:abc"


def test_job_events_channel_format() -> None:
    assert keys.job_events("abc") == "ragq:job:abc:events"


def test_model_queue_format() -> None:
    assert keys.model_queue("flan-t5-base") == "ragq.model.flan-t5-base"


def test_workers_key_format() -> None:
    assert keys.workers() == "ragq:workers"
