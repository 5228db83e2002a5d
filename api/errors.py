"""Where every error becomes an HTTP status and a JSON body `{"error": {"type", "message", "details"?}}`."""

from __future__ import annotations

import logging
from typing import Any

import redis
from flask import Flask, Response, jsonify
from kombu.exceptions import OperationalError
from werkzeug.exceptions import HTTPException

from api import metrics
from shared import errors

log = logging.getLogger(__name__)

STATUS: dict[type[errors.RagqError], int] = {
    errors.BadRequest: 400,
    errors.Unauthorized: 401,
    errors.Forbidden: 403,
    errors.NotFound: 404,
    errors.ModelNotFound: 404,
    errors.Conflict: 409,
    errors.PayloadTooLarge: 413,
    errors.ValidationFailed: 422,
    errors.TooManyRequests: 429,
    errors.Unavailable: 503,
}
RETRY_AFTER_S = 5


def error_response(
    status: int, type_: str, message: str, details: Any = None, retry_after_s: int = RETRY_AFTER_S
) -> tuple[Response, int]:
    body: dict[str, Any] = {"type": type_, "message": message}
    if details is not None:
        body["details"] = details
    response = jsonify(error=body)
    if status in (429, 503):
        response.headers["Retry-After"] = str(retry_after_s)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="ragq"'
    return response, status


def init_app(app: Flask) -> None:
    """Register the handlers that turn exceptions into JSON errors."""

    @app.errorhandler(errors.RagqError)
    def ragq_error(exc: errors.RagqError) -> tuple[Response, int]:
        retry_after_s = exc.retry_after_s if isinstance(exc, errors.TooManyRequests) else RETRY_AFTER_S
        return error_response(STATUS.get(type(exc), 500), exc.type, exc.message, exc.details, retry_after_s)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        status = exc.code or 500
        if status == 413:
            return error_response(413, errors.PayloadTooLarge.type, "request body is larger than the configured limit")
        type_ = (exc.name or "error").lower().replace(" ", "_")
        return error_response(status, type_, exc.description or exc.name)

    @app.errorhandler(redis.exceptions.ConnectionError)
    @app.errorhandler(redis.exceptions.TimeoutError)
    @app.errorhandler(OperationalError)
    def redis_down(exc: Exception) -> tuple[Response, int]:
        log.warning("redis unavailable: %s", exc)
        metrics.redis_error("api")
        return error_response(503, errors.Unavailable.type, "the job store (Redis) is unavailable; retry later")

    @app.errorhandler(redis.exceptions.ResponseError)
    def redis_refused(exc: redis.exceptions.ResponseError) -> tuple[Response, int]:
        # With maxmemory-policy noeviction a full Redis refuses writes with "OOM ..."; that is a
        # temporary capacity problem for the client, not a bug.
        # Inside a Lua script the same refusal arrives as a generic script error quoting it.
        if isinstance(exc, redis.exceptions.OutOfMemoryError) or "OOM command not allowed" in str(exc):
            log.warning("redis is full: %s", exc)
            return error_response(503, errors.Unavailable.type, "the job store (Redis) is full; retry later")
        log.exception("redis error")
        return error_response(500, "internal_error", "internal server error")

    @app.errorhandler(RecursionError)
    @app.errorhandler(ValueError)
    def unparseable_json(exc: Exception) -> tuple[Response, int]:
        # json.loads refuses integers of more than sys.get_int_max_str_digits() digits with ValueError and
        # overflows the stack on `[` x 30,000: both are the client's malformed input wherever a view parses
        # JSON (api.jobs.parse_json turns them into 400 itself). Any other ValueError is our bug.
        if isinstance(exc, RecursionError) or "integer string conversion" in str(exc):
            return error_response(400, errors.BadRequest.type, "JSON is nested too deeply or has a number too long to read")
        return unexpected(exc)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> tuple[Response, int]:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal server error")
