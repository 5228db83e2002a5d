import threading
import time

import pytest

from shared import redis_keys
from shared.jobs import TRANSITIONS, Job, JobStatus
from shared.store import JobStore


def make_job(store: JobStore, status: JobStatus = JobStatus.QUEUED) -> Job:
    job = Job(id=f"job-{time.time_ns()}", status=status, question="q?", model="tiny-t5", created_at=time.time())
    store.create(job)
    return job


ALL_PAIRS = [(a, b) for a in JobStatus for b in JobStatus]


@pytest.mark.parametrize(("source", "target"), ALL_PAIRS)
def test_transition_applies_exactly_when_the_state_machine_allows_it(
    store: JobStore, source: JobStatus, target: JobStatus
) -> None:
    job = make_job(store, source)
    outcome = store.transition(job.id, target)
    allowed = target in TRANSITIONS[source]
    assert outcome.applied is allowed
    assert outcome.previous is source
    assert store.get(job.id).status is (target if allowed else source)


def test_final_transition_sets_ttl_and_queued_has_none(store: JobStore) -> None:
    job = make_job(store)
    assert store.redis.ttl(redis_keys.job(job.id)) == -1
    store.transition(job.id, JobStatus.RUNNING)
    store.transition(job.id, JobStatus.SUCCEEDED, answer="a")
    assert 0 < store.redis.ttl(redis_keys.job(job.id)) <= store.result_ttl_s


def test_transition_of_unknown_job_applies_nothing(store: JobStore) -> None:
    outcome = store.transition("missing", JobStatus.CANCELLED)
    assert outcome.applied is False and outcome.previous is None
    assert store.redis.exists(redis_keys.job("missing")) == 0


def test_running_claims_count_attempts(store: JobStore) -> None:
    job = make_job(store)
    store.transition(job.id, JobStatus.RUNNING)
    store.transition(job.id, JobStatus.RUNNING)
    assert store.get(job.id).attempts == 2


@pytest.mark.parametrize("source", list(JobStatus))
def test_claim_returns_the_job_exactly_when_the_running_transition_applies(store: JobStore, source: JobStatus) -> None:
    job = make_job(store, source)
    outcome, claimed = store.claim(job.id, worker="w1", started_at=1.5)
    assert outcome.applied is (JobStatus.RUNNING in TRANSITIONS[source])
    assert outcome.previous is source
    if outcome.applied:
        assert claimed == store.get(job.id)
        assert (claimed.status, claimed.worker, claimed.started_at, claimed.attempts) == (JobStatus.RUNNING, "w1", 1.5, 1)
    else:
        assert claimed is None


def test_claim_of_unknown_job_returns_nothing(store: JobStore) -> None:
    outcome, claimed = store.claim("missing", worker="w1")
    assert (outcome.applied, outcome.previous, claimed) == (False, None, None)


def test_cancel_racing_completion_yields_one_final_state(store: JobStore) -> None:
    for _ in range(20):
        job = make_job(store)
        store.transition(job.id, JobStatus.RUNNING)
        results: dict[JobStatus, bool] = {}
        barrier = threading.Barrier(2)

        def attempt(target: JobStatus, job_id: str = job.id) -> None:
            barrier.wait()
            results[target] = store.transition(job_id, target, answer="x").applied

        threads = [threading.Thread(target=attempt, args=(t,)) for t in (JobStatus.SUCCEEDED, JobStatus.CANCELLED)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results.values()) == [False, True]
        final = store.get(job.id).status
        assert results[final] is True


def test_wait_returns_current_state_after_timeout(store: JobStore) -> None:
    job = make_job(store)
    started = time.monotonic()
    assert store.wait_until_final(job.id, 0.5).status is JobStatus.QUEUED
    assert time.monotonic() - started >= 0.5


def test_wait_returns_as_soon_as_the_job_finishes(store: JobStore) -> None:
    job = make_job(store)
    timer = threading.Timer(0.3, lambda: store.transition(job.id, JobStatus.CANCELLED))
    timer.start()
    started = time.monotonic()
    result = store.wait_until_final(job.id, 10)
    elapsed = time.monotonic() - started
    timer.join()
    assert result.status is JobStatus.CANCELLED
    assert 0.2 < elapsed < 3


def test_wait_ignores_non_final_changes(store: JobStore) -> None:
    job = make_job(store)
    threading.Timer(0.2, lambda: store.transition(job.id, JobStatus.RUNNING)).start()
    assert store.wait_until_final(job.id, 1.0).status is JobStatus.RUNNING
