"""`python -m bench.fuzz`: property-based fuzzing of the running API from its own OpenAPI document.

Starts an embedded Redis and the API under gunicorn (API keys on; no worker, so jobs stay queued), loads
`/openapi.json` with schemathesis and sends at least `--cases` generated requests (valid and invalid ones,
spread over every operation), then `--sequences` stateful call sequences chained by the links schemathesis
infers (a `POST` that creates a job or batch, then `GET`, cancel or results of that very id). Every response must be documented for its operation, match the documented
schema (JobView, BatchView, Error, ...), and never be a server error. Prints a table of the cases per
operation and status, and writes `--json PATH`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import Stack, report

FUZZ_KEY = "fuzz-key-0123456789abcdef"
HEADERS = {"Authorization": f"Bearer {FUZZ_KEY}"}


def fuzz(schema: Any, cases: int, base_url: str | None = None, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Send about `cases` generated requests spread over the schema's operations; count statuses and failures.

    Each response goes through schemathesis's checks: no 5xx, status documented, body and headers as documented.
    """
    from hypothesis import HealthCheck, Phase, given, seed, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import FailureGroup, ignored_auth, positive_data_acceptance

    EXCLUDED = [
        # Requests carry a valid key here; tests/test_security.py covers missing and bad keys.
        ignored_auth,
        # "Every schema-valid request is accepted" cannot hold for rules OpenAPI cannot state: a CSV body
        # needs a header row, JSONL needs unique custom_ids, a callback_url needs a configured secret.
        # Such requests get a documented 4xx, which the other checks do verify.
        positive_data_acceptance,
    ]

    rejections = schema.config.checks.negative_data_rejection
    # gunicorn refuses an overlong request line (query string) with 414 before the app sees it: a rejection too.
    rejections.expected_statuses = [*rejections.expected_statuses, "414"]
    operations = [result.ok() for result in schema.get_all_operations()]
    per_operation = max(1, math.ceil(cases / len(operations) / 2))
    statuses: Counter[str] = Counter()
    failures: list[dict[str, str]] = []
    sent = false_alarms = 0
    round_ = 0
    # Valid and invalid requests (schemathesis's positive and negative modes), rounds with new seeds until
    # `cases` were sent: operations with few distinct inputs (health checks) end a round early.
    while sent < cases:
        sent_before = sent
        for operation, mode in itertools.product(operations, GenerationMode):

            @seed(round_)
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=per_operation,
                deadline=None,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def one(case: Any) -> None:
                nonlocal sent, false_alarms
                response = case.call(base_url=base_url, headers=headers)
                sent += 1
                statuses[f"{operation.label} -> {response.status_code}"] += 1
                try:
                    case.validate_response(response, excluded_checks=EXCLUDED)
                except FailureGroup as exc:  # every failed check of one response, together
                    if _lost_in_transit(case, exc):
                        false_alarms += 1
                        return
                    failures.append({"operation": operation.label, "status": str(response.status_code), "query": repr(case.query), "failure": str(exc)[:3000]})

            try:
                one()
            except Unsatisfiable:
                pass  # nothing to make invalid in an operation without inputs (the health checks)
        round_ += 1
        if sent == sent_before:
            break  # nothing more to generate
    server_errors = sum(n for label, n in statuses.items() if label.rsplit(" ", 1)[1].startswith("5"))
    return {
        "cases": sent,
        "operations": len(operations),
        "rounds": round_,
        "server_errors": server_errors,
        "check_failures": len(failures),
        "false_alarms": false_alarms,
        "failures": failures[:20],
        "statuses": dict(sorted(statuses.items())),
    }


def fuzz_stateful(
    schema: Any, examples: int, steps: int = 6, base_url: str | None = None, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """Sequences of calls chained by the links schemathesis infers from the document (a `POST` creating a job
    or batch, then the `GET`, cancel and results of that very id), each response checked as in `fuzz`."""
    from hypothesis import HealthCheck, Phase, settings
    from hypothesis.errors import FlakyStrategyDefinition
    from schemathesis.checks import FailureGroup, ignored_auth, positive_data_acceptance

    excluded = [ignored_auth, positive_data_acceptance]  # as in `fuzz`, for the same reasons
    statuses: Counter[str] = Counter()
    failures: list[dict[str, str]] = []

    class Machine(schema.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"headers": headers or {}, **({"base_url": base_url} if base_url else {})}

        def before_call(self, case: Any) -> None:
            # A linked `GET` waits on a job no worker serves: keep long-polls short so sequences keep moving.
            if case.query and isinstance(case.query.get("wait"), int | float):
                case.query["wait"] = min(case.query["wait"], 0.2)

        def validate_response(self, response: Any, case: Any, **_: Any) -> None:
            statuses[f"{case.operation.label} -> {response.status_code}"] += 1
            try:
                case.validate_response(response, excluded_checks=excluded)
            except FailureGroup as exc:
                failures.append({"operation": case.operation.label, "status": str(response.status_code), "failure": str(exc)[:3000]})

    run_settings = settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        database=None,
        # Generation only: later steps depend on ids the server made up (new on every run), so replaying a
        # sequence to shrink it cannot take the same path; failures are recorded per response, never raised.
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    try:
        Machine.run(settings=run_settings)
    except FlakyStrategyDefinition:
        # Later steps depend on ids the server made up, so Hypothesis may find two sequences that began alike
        # going different ways and stop; what was sent until then is counted.
        stopped_early = True
    else:
        stopped_early = False
    server_errors = sum(n for label, n in statuses.items() if label.rsplit(" ", 1)[1].startswith("5"))
    return {
        "calls": sum(statuses.values()),
        "stopped_early": stopped_early,
        "server_errors": server_errors,
        "check_failures": len(failures),
        "failures": failures[:20],
        "statuses": dict(sorted(statuses.items())),
    }


def _lost_in_transit(case: Any, failures: BaseExceptionGroup[Any]) -> bool:
    """A "schema-violating request accepted" whose violation never left the client: a query parameter whose
    value is null or an empty list, which HTTP clients leave out, so the request sent was a valid one."""
    from schemathesis.specs.openapi.checks import AcceptedNegativeData

    dropped = any(value is None or value == [] for value in (case.query or {}).values())
    return dropped and all(isinstance(failure, AcceptedNegativeData) for failure in failures.exceptions)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000, help="generated requests in all (default 1000)")
    parser.add_argument("--sequences", type=int, default=200, help="stateful call sequences (default 200; 0: none)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    import schemathesis

    work = Path(tempfile.mkdtemp(prefix="ragq-fuzz-"))
    stack = Stack(work, RAGQ_API_KEYS=f"fuzz:{FUZZ_KEY}", RAGQ_RATE_LIMIT_PER_MIN="1000000000")
    try:
        stack.start_api()
        started = time.monotonic()
        schema = schemathesis.openapi.from_url(f"{stack.url}/openapi.json")
        figures = fuzz(schema, args.cases, base_url=stack.url, headers=HEADERS)
        figures["seconds"] = round(time.monotonic() - started, 1)
        if args.sequences:
            started = time.monotonic()
            stateful = fuzz_stateful(schema, args.sequences, base_url=stack.url, headers=HEADERS)
            stateful["seconds"] = round(time.monotonic() - started, 1)
            figures["stateful"] = stateful
    finally:
        stack.close()
    table = {k: v for k, v in figures.items() if k not in ("statuses", "failures")}
    report(table | {f"  {label}": n for label, n in figures["statuses"].items()}, None)
    stateful = figures.get("stateful")
    if stateful:
        print("\nstateful sequences (links from a POST to the GET, cancel and results of what it created):")
        rows = {k: v for k, v in stateful.items() if k not in ("statuses", "failures")}
        report(rows | {f"  {label}": n for label, n in stateful["statuses"].items()}, None)
    for failure in figures["failures"] + (stateful["failures"] if stateful else []):
        print(f"FAILED {failure['operation']} -> {failure['status']}: {failure['failure']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))
    problems = figures["server_errors"] + figures["check_failures"]
    if stateful:
        problems += stateful["server_errors"] + stateful["check_failures"]
    return 0 if problems == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
