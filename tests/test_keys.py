from shared import keys


def test_job_key_format() -> None:
    assert keys.job("abc") == "ragq:job:abc"


def test_job_events_channel_format() -> None:
    assert keys.job_events("abc") == "ragq:job:abc:events"


def test_model_queue_format() -> None:
    assert keys.model_queue("flan-t5-base") == "ragq.model.flan-t5-base"


def test_workers_key_format() -> None:
    assert keys.workers() == "ragq:workers"


def test_batch_key_formats() -> None:
    assert keys.batch("b1") == "ragq:batch:b1"
    assert keys.batch_counts("b1") == "ragq:batch:b1:counts"
    assert keys.batch_jobs("b1") == "ragq:batch:b1:jobs"
    assert keys.batch_pending("b1") == "ragq:batch:b1:pending"
    assert keys.batch_events("b1") == "ragq:batch:b1:events"
    assert keys.active_batches("m") == "ragq:batches:active:m"
    assert keys.callbacks() == "ragq:callbacks"
    assert keys.idempotency("job", "abc") == "ragq:idempotency:job:abc"
    assert keys.batch_deadlines() == "ragq:batches:deadlines"
    assert keys.callback_attempts() == "ragq:callbacks:attempts"


def test_batch_queue_format() -> None:
    assert keys.model_batch_queue("flan-t5-base") == "ragq.model.flan-t5-base.batch"


def test_job_events_channel_extends_the_job_key() -> None:
    # The transition script publishes on `<job key>:events` without calling back into Python.
    assert keys.job_events("abc") == keys.job("abc") + ":events"


def test_worker_key_formats() -> None:
    assert keys.worker_alive("w@h") == "ragq:worker:w@h:alive"
    assert keys.worker_jobs("w@h") == "ragq:worker:w@h:jobs"
    assert keys.workers_with_jobs() == "ragq:workers:with-jobs"


def test_message_audit_key_formats() -> None:
    assert keys.sent("m") == "ragq:sent:m"
    # Kombu's own names: the audit reads them, so a Kombu option that renames them would break it.
    assert keys.broker_unacked() == "unacked"
    assert keys.broker_unacked_index() == "unacked_index"


def test_tenant_key_formats() -> None:
    assert keys.tenant_outstanding("acme") == "ragq:tenant:acme:outstanding"
    assert keys.tenant_rate("acme", 29_000_000) == "ragq:tenant:acme:rate:29000000"
    assert keys.tenant_batches("acme") == "ragq:tenant:acme:batches"
