"""The HTTP client of the `ragq` client commands (`ask`, `batch`, `eval`) and the one way their errors are printed."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import requests

from shared.config import Settings

DEFAULT_URL = "http://127.0.0.1:8000"
HTTP_TIMEOUT_S = 30
RESULTS_CHUNK_BYTES = 64 * 1024
# Answers a long wait should ride out (an API restart, a Redis hiccup) rather than give up on.
TRANSIENT_STATUSES = frozenset({502, 503, 504})


class ApiError(Exception):
    """A request the API refused (`response` set) or could not be made at all (`response` is None)."""

    def __init__(
        self, base_url: str, response: requests.Response | None = None, cause: Exception | None = None
    ) -> None:
        reason = f"HTTP {response.status_code}" if response is not None else f"cannot reach {base_url}: {cause}"
        super().__init__(reason)
        self.base_url = base_url
        self.response = response
        self.cause = cause

    @property
    def transient(self) -> bool:
        """Worth trying again shortly: no connection, a timeout, or a 502/503/504."""
        if self.response is None:
            return isinstance(self.cause, (requests.ConnectionError, requests.Timeout))
        return self.response.status_code in TRANSIENT_STATUSES


def auth_headers() -> dict[str, str]:
    """`Authorization: Bearer $RAGQ_API_KEY` when a key is set (the API needs one once keys are configured)."""
    key = Settings.from_env().api_key
    return {"Authorization": f"Bearer {key}"} if key else {}


class ApiClient:
    """The ragq API at one base URL: every request sends the API key (if set), has a timeout, and raises ApiError."""

    def __init__(self, base_url: str, timeout_s: float = HTTP_TIMEOUT_S) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.headers = auth_headers()

    def request(
        self,
        method: str,
        path: str,
        expected: Sequence[int] = (200,),
        timeout_s: float | None = None,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> requests.Response:
        """`method` on `path`; raises ApiError unless the answer's status is one of `expected`."""
        try:
            response = requests.request(
                method,
                self.base_url + path,
                headers={**self.headers, **(headers or {})},
                timeout=self.timeout_s if timeout_s is None else timeout_s,
                **kwargs,
            )
        except requests.RequestException as exc:
            raise ApiError(self.base_url, cause=exc) from exc
        if response.status_code not in expected:
            raise ApiError(self.base_url, response)
        return response

    def get_json(self, path: str, **kwargs: Any) -> Any:
        """The JSON body of a GET that must answer 200."""
        return self.request("GET", path, **kwargs).json()

    @contextlib.contextmanager
    def stream_lines(self, path: str, params: dict[str, str] | None = None) -> Iterator[Iterator[bytes]]:
        """A streamed GET that must answer 200, as its non-empty lines; a connection lost midway raises ApiError."""
        try:
            with requests.get(
                self.base_url + path, params=params, headers=self.headers, stream=True, timeout=self.timeout_s
            ) as response:
                if response.status_code != 200:
                    raise ApiError(self.base_url, response)
                yield (line for line in response.iter_lines(chunk_size=RESULTS_CHUNK_BYTES) if line)
        except requests.RequestException as exc:
            raise ApiError(self.base_url, cause=exc) from exc


def print_api_error(error: ApiError) -> int:
    """Print one line for a refused request or an unreachable API; returns the exit code 2."""
    response = error.response
    if response is None:
        print(f"ragq: cannot reach {error.base_url}: {error.cause}", file=sys.stderr)
        return 2
    try:
        body = response.json()["error"]
        message = f"{body['type']}: {body['message']}"
        if body.get("details"):
            message += f" {json.dumps(body['details'])}"
    except (ValueError, KeyError, TypeError):
        message = response.text[:500]
    print(f"ragq: HTTP {response.status_code}: {message}", file=sys.stderr)
    return 2


def handles_api_errors(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap a command so that a refused request or an unreachable API prints one line and exits 2."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except ApiError as exc:
            return print_api_error(exc)

    return run


def add_url_option(parser: argparse.ArgumentParser) -> None:
    """The `--url` option every client command takes."""
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the API (default {DEFAULT_URL})")
