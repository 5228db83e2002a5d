"""Retrying only what failed: a new batch of an ended batch's failed and expired items, and the results of a
batch and its retries merged by `custom_id`."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from typing import Any

from shared.batch_store import BatchStore
from shared.batches import Batch
from shared.errors import Conflict, NotFound
from shared.jobs import Job, JobStatus
from shared.openai_shapes import REJECTED_TYPES

EXPIRED_TYPE = "expired"
# Batches followed from one to the first of its chain, and retries followed down from that one, at most.
MAX_CHAIN = 50


def error_type(job: Job) -> str | None:
    """What a retry filter (`?error_type=`) matches for an item that may be retried; None if it may not."""
    if job.status is JobStatus.EXPIRED:
        return EXPIRED_TYPE
    if job.status is JobStatus.FAILED:
        kind = (job.error or {}).get("type", "error")
        # A refused line would be refused again: fix the input instead.
        return None if kind in REJECTED_TYPES else kind
    return None


def retry_rows(store: BatchStore, batch_id: str, new_id: str, tenant: str, error_types: list[str]) -> tuple[Batch, Iterator[list[Any]]]:
    """The retry batch's record and item rows: the original's failed (not refused) and expired items whose type is
    in `error_types` (any when empty). 409 when the original has not ended or nothing is left to retry."""
    original, _ = store.get(batch_id, tenant)
    if not original.status.has_ended:
        raise Conflict(f"batch is still {original.status.value}; retry it once it has ended", details={"status": original.status.value})
    wanted = set(error_types)

    def retryable(job: Job) -> bool:
        kind = error_type(job)
        return kind is not None and (not wanted or kind in wanted)

    rows = (
        [str(uuid.uuid4()), job.question, job.course, job.top_k, job.params, job.custom_id]
        for job in store.jobs_of(batch_id)
        if retryable(job)
    )
    first = next(rows, None)
    if first is None:
        raise Conflict(
            "nothing to retry: the batch has no failed or expired items" + (f" of type {', '.join(sorted(wanted))}" if wanted else "")
            + " (refused lines are not retried: fix them in a new file)",
            details={"error_types": sorted(wanted)},
        )
    batch = Batch.new(
        model=original.model, total=0, completion_window=original.completion_window, metadata=original.metadata,
        callback_url=original.callback_url, tenant=tenant, batch_id=new_id,
    )
    batch = dataclasses.replace(batch, input_file_id=original.input_file_id, endpoint=original.endpoint, retry_of=original.id)
    return batch, _chain_rows(first, rows)


def _chain_rows(first: list[Any], rest: Iterator[list[Any]]) -> Iterator[list[Any]]:
    yield first
    yield from rest


def merged_results(store: BatchStore, batch_id: str, tenant: str) -> Iterator[dict[str, Any]]:
    """The results of the first batch of `batch_id`'s retry chain in its input order, each item replaced by the
    result of the newest retry that holds its custom_id; each result names the batch that answered it.

    Memory holds one result per retried item (never more than the first batch's items)."""
    root = batch_id
    for _ in range(MAX_CHAIN):
        found, _ = store.get(root, tenant)
        if found.retry_of is None:
            break
        try:
            store.get(found.retry_of, tenant)
        except NotFound:
            break  # the original has expired: the chain starts here
        root = found.retry_of
    retries = _descendants(store, root, tenant)
    newest: dict[str, dict[str, Any]] = {}
    for retry_id in retries:
        for result in store.results(retry_id, None, tenant):
            newest[result["custom_id"]] = {**result, "batch_id": retry_id}
    for result in store.results(root, None, tenant):
        yield newest.get(result["custom_id"], {**result, "batch_id": root})


def _descendants(store: BatchStore, root: str, tenant: str) -> list[str]:
    """The retries below `root`, oldest first (breadth first, so a later retry overrides an earlier one)."""
    order: list[tuple[float, str]] = []
    frontier = [root]
    while frontier and len(order) < MAX_CHAIN:
        current = frontier.pop(0)
        try:
            found, _ = store.get(current, tenant)
        except NotFound:
            continue
        for child in found.retried_by or []:
            try:
                child_batch, _ = store.get(child, tenant)
            except NotFound:
                continue
            order.append((child_batch.created_at, child))
            frontier.append(child)
    return [batch for _, batch in sorted(order)]
