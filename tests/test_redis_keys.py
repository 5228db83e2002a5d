from shared import redis_keys


def test_job_key_format() -> None:
    assert redis_keys.job("abc") == "ragq:job:abc"


def test_job_events_channel_format() -> None:
    assert redis_keys.job_events("abc") == "ragq:job:abc:events"


def test_all_job_events_pattern_matches_each_job_events_channel() -> None:
    import fnmatch

    assert redis_keys.all_job_events() == "ragq:job:*:events"
    assert fnmatch.fnmatchcase(redis_keys.job_events("abc"), redis_keys.all_job_events())
    assert redis_keys.job_id_of_events(redis_keys.job_events("abc")) == "abc"


def test_model_queue_format() -> None:
    assert redis_keys.model_queue("flan-t5-base") == "ragq.model.flan-t5-base"


def test_workers_key_format() -> None:
    assert redis_keys.workers() == "ragq:workers"


def test_batch_key_formats() -> None:
    assert redis_keys.batch("b1") == "ragq:batch:b1"
    assert redis_keys.batch_counts("b1") == "ragq:batch:b1:counts"
    assert redis_keys.batch_jobs("b1") == "ragq:batch:b1:jobs"
    assert redis_keys.batch_pending("b1") == "ragq:batch:b1:pending"
    assert redis_keys.batch_events("b1") == "ragq:batch:b1:events"
    assert redis_keys.active_batches("m") == "ragq:batches:active:m"
    assert redis_keys.callbacks() == "ragq:callbacks"
    assert redis_keys.idempotency("job", "abc") == "ragq:idempotency:job:abc"
    assert redis_keys.batch_deadlines() == "ragq:batches:deadlines"
    assert redis_keys.callback_attempts() == "ragq:callbacks:attempts"


def test_batch_queue_format() -> None:
    assert redis_keys.model_batch_queue("flan-t5-base") == "ragq.model.flan-t5-base.batch"


def test_job_events_channel_extends_the_job_key() -> None:
    # The transition script publishes on `<job key>:events` without calling back into Python.
    assert redis_keys.job_events("abc") == redis_keys.job("abc") + ":events"


def test_worker_key_formats() -> None:
    assert redis_keys.worker_alive("w@h") == "ragq:worker:w@h:alive"
    assert redis_keys.worker_jobs("w@h") == "ragq:worker:w@h:jobs"
    assert redis_keys.workers_with_jobs() == "ragq:workers:with-jobs"


def test_message_audit_key_formats() -> None:
    assert redis_keys.sent("m") == "ragq:sent:m"
    # Kombu's own names: the audit reads them, so a Kombu option that renames them would break it.
    assert redis_keys.broker_unacked() == "unacked"
    assert redis_keys.broker_unacked_index() == "unacked_index"


def test_tenant_key_formats() -> None:
    assert redis_keys.tenant_outstanding("acme") == "ragq:tenant:acme:outstanding"
    assert redis_keys.tenant_rate("acme", 29_000_000) == "ragq:tenant:acme:rate:29000000"
    assert redis_keys.tenant_batches("acme") == "ragq:tenant:acme:batches"


def test_tenant_batch_accounting_key_formats() -> None:
    assert redis_keys.tenant_batches("t") == "ragq:tenant:t:batches"
    assert redis_keys.tenant_stored_batches("t") == "ragq:tenant:t:stored-batches"
    assert redis_keys.tenant_stored_items("t") == "ragq:tenant:t:stored-items"


def test_file_key_formats() -> None:
    assert redis_keys.file("file-1") == "ragq:file:file-1"
    assert redis_keys.file_chunks("file-1") == "ragq:file:file-1:chunks"
    assert redis_keys.tenant_files("t") == "ragq:tenant:t:files"
