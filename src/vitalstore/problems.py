"""Every exception that becomes an answer, with the HTTP status it answers with.

One hierarchy in one module (as httpx's `_exceptions.py`): the code that finds a problem
raises it, and `api.common.answer` is the one mapping from a problem to a response.
"""

from __future__ import annotations

from typing import Any

import msgspec

RETRY_AFTER: dict[str, str] = {"Retry-After": "1"}


class Problem(Exception):
    """An exception with an HTTP meaning: `status`, and a message for the client."""

    status: int = 500
    headers: dict[str, str] | None = None

    def content(self) -> dict[str, Any]:
        """The answer's JSON body."""
        return {"error": str(self)}


# -- request bodies (ingest) ----------------------------------------------------------------


class BodyProblem(Problem):
    """The body cannot be read: wrong encoding, too large, too slow, cut short (400-415)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class MalformedBody(Problem):
    """The body is not JSON (or NDJSON) of the expected shape."""

    status = 400


class TooManyReadings(Problem):
    """More readings in one request than allowed."""

    status = 413


class ItemError(msgspec.Struct):
    """What is wrong with one item of a request."""

    index: int
    field: str
    message: str


class InvalidItems(Problem):
    """Some items are invalid: every error (up to readings.MAX_REPORTED_ERRORS)."""

    status = 422

    def __init__(self, errors: list[ItemError]) -> None:
        super().__init__(f"{len(errors)} invalid item(s)")
        self.errors = errors

    def content(self) -> dict[str, Any]:
        return {"errors": [msgspec.structs.asdict(e) for e in self.errors]}


class Rejected(Problem):
    """The database refused this request's data; index -1: the whole request."""

    status = 422

    def content(self) -> dict[str, Any]:
        return {"errors": [{"index": -1, "field": "", "message": str(self)}]}


class RetryLater(Problem):
    """503 with Retry-After; `cause` labels it in the telemetry."""

    status = 503
    headers = RETRY_AFTER
    cause = "unknown"


class Overloaded(RetryLater):
    """The buffer is full: retry soon."""

    cause = "buffer_full"


class Unavailable(RetryLater):
    """The database cannot be reached, or the service is shutting down."""

    def __init__(self, message: str, cause: str = "database_unavailable") -> None:
        super().__init__(message)
        self.cause = cause


# -- queries ---------------------------------------------------------------------------------


class BadQuery(Problem):
    """A query parameter that cannot be used, named in the answer."""

    status = 422

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(f"{parameter}: {message}")
        self.parameter = parameter

    def content(self) -> dict[str, Any]:
        return {"error": str(self), "parameter": self.parameter}


class TooManyBuckets(Problem):
    """An aggregates request over its item limit; `suggestion` is a coarser bucket that fits."""

    status = 422

    def __init__(self, limit: int, suggestion: str | None) -> None:
        advice = (f"use a coarser bucket such as {suggestion}, or a shorter range"
                  if suggestion else "use a shorter range")
        super().__init__(f"more than {limit} items; {advice}")
        self.suggestion = suggestion

    def content(self) -> dict[str, Any]:
        return {"error": str(self), "parameter": "bucket", "suggested_bucket": self.suggestion}


# -- API keys --------------------------------------------------------------------------------


class InvalidKeySpec(Problem, ValueError):
    """A name, scope list or prefix that a key cannot have (an error on the CLI too)."""

    status = 422


class DuplicateName(InvalidKeySpec):
    """An active key with the same prefix already has this name."""


class AmbiguousName(Problem):
    """More than one active key has this name (with different prefixes): name one by id."""

    status = 409

    def __init__(self, name: str, ids: list[int]) -> None:
        super().__init__(f"several active keys are named {name!r} (ids"
                         f" {', '.join(map(str, ids))}); name one by its id")
        self.ids = ids
