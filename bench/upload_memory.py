"""`python -m bench.upload_memory`: peak Python memory of the API while it takes one large batch upload.

Builds a CSV and a JSONL body of about `--mb` megabytes (one non-ASCII character in each, the case that once
cost 12x the body), posts each through the Flask test client to an API on an embedded Redis, and reports the
`tracemalloc` peak over the request against the body size. The body itself is allocated before the
measurement starts; the test client's copy of it into the request stream is counted.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import tracemalloc
from pathlib import Path

from api import create_app
from cli.redis_server import start_redis
from shared.config import Settings
from shared.models import ModelSpec
from shared.store import connect


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
    args = parser.parse_args()
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
            print("| body | bytes | lines | peak (tracemalloc) | peak / body | seconds |\n|---|---|---|---|---|---|")
            for content_type, body in bodies(args.mb).items():
                connect(server.url).flushdb()
                tracemalloc.start()
                tracemalloc.reset_peak()
                started = time.perf_counter()
                response = client.post("/v1/batches?model=unserved", data=body, content_type=content_type)
                seconds = time.perf_counter() - started
                _, peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
                assert response.status_code == 202, response.get_data()[:500]
                lines = response.get_json()["request_counts"]["total"]
                print(
                    f"| {content_type} | {len(body):,} | {lines:,} | {peak / 1e6:.1f} MB | {peak / len(body):.2f}x | {seconds:.1f} |"
                )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
