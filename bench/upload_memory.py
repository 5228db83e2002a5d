"""`python -m bench.upload_memory`: peak Python memory of the API while it takes one large batch upload.

Builds a CSV and a JSONL body of about `--mb` megabytes (one non-ASCII character in each, the case that once
cost 12x the body), posts each through the Flask test client to an API on an embedded Redis, and reports the
`tracemalloc` peak over the request against the body size. The body itself is allocated before the
measurement starts; the test client's copy of it into the request stream is counted. Also reports the longest
single Redis call of the upload (from `SLOWLOG`): the commit script makes every item permanent in one call, and
Redis serves nobody else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from api import create_app
from cli.redis_server import start_redis
from shared.config import Settings
from shared.models import ModelSpec
from shared.store import connect

# Redis calls longer than this are logged by SLOWLOG during the upload (microseconds).
SLOWLOG_FROM_US = 1000


def longest_call(client: Any) -> tuple[float, str]:
    """The longest call SLOWLOG recorded, in ms, and its command (a script's first argument is its sha)."""
    entries = client.slowlog_get(1024)
    if not entries:
        return 0.0, "-"
    slowest = max(entries, key=lambda entry: entry["duration"])
    command = slowest["command"]
    name = (command.decode() if isinstance(command, bytes) else str(command)).split(" ")[0]
    return slowest["duration"] / 1000, name


def bodies(megabytes: float) -> dict[str, bytes]:
    """A CSV and a JSONL body of about `megabytes` each, ~200-byte questions, one non-ASCII character."""
    question = "How do I make sure that my homework submission for the module is counted before the deadline, " * 2
    lines = int(megabytes * 1_000_000 / (len(question) + 12))
    csv_rows = ["custom_id,question"] + [f"{i},{question}{i}" for i in range(lines)]
    csv_rows[1] = csv_rows[1].replace("How", "Hów")
    jsonl_rows = [json.dumps({"custom_id": str(i), "question": f"{question}{i}"}) for i in range(lines)]
    jsonl_rows[0] = jsonl_rows[0].replace("How", "H\u00f3w")
    return {"text/csv": "\n".join(csv_rows).encode(), "application/x-ndjson": "\n".join(jsonl_rows).encode()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=20.0, help="body size in MB")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        server = start_redis(Path(tmp) / "redis", appendonly=False)
        try:
            settings = Settings(
                redis_url=server.url,
                default_model=ModelSpec("unserved", "nowhere/none"),
                data_dir=Path(tmp) / "data",
                max_batch_lines=1_000_000,
            )
            client = create_app(settings).test_client()
            print(
                "| body | bytes | lines | peak (tracemalloc) | peak / body | seconds | longest Redis call |\n"
                "|---|---|---|---|---|---|---|"
            )
            redis_client = connect(server.url)
            redis_client.config_set("slowlog-log-slower-than", SLOWLOG_FROM_US)
            redis_client.config_set("slowlog-max-len", 1024)
            for content_type, body in bodies(args.mb).items():
                redis_client.flushdb()
                redis_client.slowlog_reset()
                tracemalloc.start()
                tracemalloc.reset_peak()
                started = time.perf_counter()
                response = client.post("/v1/batches?model=unserved", data=body, content_type=content_type)
                seconds = time.perf_counter() - started
                _, peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
                assert response.status_code == 202, response.get_data()[:500]
                lines = response.get_json()["request_counts"]["total"]
                longest_ms, command = longest_call(redis_client)
                print(
                    f"| {content_type} | {len(body):,} | {lines:,} | {peak / 1e6:.1f} MB | {peak / len(body):.2f}x "
                    f"| {seconds:.1f} | {longest_ms:.0f} ms ({command}) |"
                )
                rows.append(
                    {
                        "content_type": content_type,
                        "bytes": len(body),
                        "lines": lines,
                        "peak_bytes": peak,
                        "seconds": seconds,
                        "longest_redis_call_ms": longest_ms,
                        "longest_redis_command": command,
                    }
                )
        finally:
            server.stop()
    if args.json:
        args.json.write_text(json.dumps({"runs": rows}, indent=2))


if __name__ == "__main__":
    main()
