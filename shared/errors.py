"""The one error hierarchy of ragq. HTTP statuses for these are chosen in `api.errors` alone."""

from __future__ import annotations

from typing import Any


class RagqError(Exception):
    """Base class of every error ragq raises on purpose."""

    type = "error"

    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class ConfigError(RagqError):
    """The configuration is invalid; start-up stops with this message."""

    type = "config_error"


class BadRequest(RagqError):
    """The request body is not well-formed JSON, or not JSON at all."""

    type = "bad_request"


class ValidationFailed(RagqError):
    """The request is well-formed but a field is missing, unknown or out of bounds."""

    type = "validation_error"


class Unauthorized(RagqError):
    """No API key, or one that names no tenant."""

    type = "unauthorized"


class Forbidden(RagqError):
    """The caller may not use this API at all from where it is (a non-loopback peer or foreign Host without keys)."""

    type = "forbidden"


class TooManyRequests(RagqError):
    """A tenant's quota (outstanding jobs) or request rate is used up; retry after `retry_after_s`."""

    type = "too_many_requests"

    def __init__(self, message: str, retry_after_s: int, details: Any = None) -> None:
        super().__init__(message, details)
        self.retry_after_s = retry_after_s


class NotFound(RagqError):
    """No job with this id exists (or it has expired)."""

    type = "not_found"


class ModelNotFound(NotFound):
    """No served model has this name."""

    type = "model_not_found"


class Conflict(RagqError):
    """The job is in a state that does not allow the operation."""

    type = "conflict"


class PayloadTooLarge(RagqError):
    """The request body is larger than the configured limit."""

    type = "payload_too_large"


class Unavailable(RagqError):
    """Redis (the broker and job store) cannot be reached."""

    type = "unavailable"


class ModelLoadError(RagqError):
    """A worker could not load its model."""

    type = "model_load_error"


class CorpusError(RagqError):
    """The FAQ corpus could not be read or has the wrong shape."""

    type = "corpus_error"
