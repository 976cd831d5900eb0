"""Helpers every route module uses: the services, error answers, query parameters."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any

from litestar import Request, Response
from litestar.datastructures import State
from litestar.exceptions import ValidationException
from litestar.params import QueryParameter

from vitalstore.api.responses import COMPAT_PATH, error_body
from vitalstore.problems import RETRY_AFTER, BadQuery, Problem
from vitalstore.readings import parse_time, storable
from vitalstore.services import Services

log = logging.getLogger(__name__)

OptionalQuery = Annotated[str | None, QueryParameter(required=False)]
# `metrics=a,b` or `metrics=a&metrics=b`: a plain `str` parameter would keep only the last.
NamesQuery = Annotated[list[str] | None, QueryParameter(required=False)]


def services_of(state: State) -> Services:
    services: Services = state.services
    return services


def error(status: int, message: str, *, headers: Mapping[str, str] | None = None,
          **extra: Any) -> Response[Any]:
    """An error answer: `{"error": message, ...}`."""
    return Response({"error": message, **extra}, status_code=status, headers=headers)


def compat_error(status: int, message: str, *, headers: Mapping[str, str] | None = None
                 ) -> Response[Any]:
    """An error answer of the old API: `{"status": "error", "message": message}`."""
    return Response(error_body(COMPAT_PATH, message), status_code=status, headers=headers)


# `...T10:00:00 00:00`: a `+` left unencoded in a URL arrives as a space.
_PLUS_AS_SPACE = re.compile(r"[0-9] [0-9]{2}(:?[0-9]{2})?$")


def query_time(name: str, value: str | None, default: datetime) -> datetime:
    if value is None or value == "":
        return default
    try:
        return parse_time(value)
    except ValueError as exc:
        message = str(exc)
        if _PLUS_AS_SPACE.search(value.strip()):
            message += "; a '+' in a URL arrives as a space: encode it as %2B, or use Z"
        raise BadQuery(name, message) from None


def query_range(from_: str | None, to: str | None, earliest: datetime, latest: datetime
                ) -> tuple[datetime, datetime]:
    """`[from, to)` of a query, defaults for what is left out; `from` after `to` is refused
    (a range with one end left out may lie beyond the other default end: it is just empty)."""
    start = query_time("from", from_, earliest)
    end = query_time("to", to, latest)
    if from_ and to and start > end:
        raise BadQuery("from", "must not be after to")
    return start, end


_INTEGER = re.compile(r"-?[0-9]{1,18}")
UNSTORABLE = "must not contain U+0000 (NUL) or unpaired surrogates"


def query_text(name: str, value: str) -> str:
    """A text parameter that goes to the database: refused here if PostgreSQL cannot take it."""
    if not storable(value):
        raise BadQuery(name, UNSTORABLE)
    return value


def query_int(name: str, value: str | None, default: int, low: int, high: int) -> int:
    if value is None or value == "":
        return default
    # ASCII digits only: int() would take '1_000', ' 5 ' and other scripts' digits too.
    if not _INTEGER.fullmatch(value):
        raise BadQuery(name, "must be an integer")
    number = int(value)
    if not low <= number <= high:
        raise BadQuery(name, f"must be between {low} and {high}")
    return number


def query_names(name: str, values: list[str] | None) -> list[str]:
    """A list parameter, repeated or comma-separated (`metrics=hr,spo2&metrics=temp`)."""
    return [item for value in values or () for item in query_text(name, value).split(",")
            if item]


def answer(problem: Problem) -> Response[Any]:
    """The one mapping from a problem to its answer: its status, body and headers."""
    return Response(problem.content(), status_code=problem.status, headers=problem.headers)


def problem_handler(request: Request[Any, Any, Any], exc: Problem) -> Response[Any]:
    """Exception handler: a problem a handler raised (rather than returned) is answered too."""
    return answer(exc)


def database_unavailable(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """Exception handler: a read that lost its database answers 503, not 500."""
    log.warning("database error on %s: %s: %s", request.url.path, type(exc).__name__, exc)
    return Response(error_body(request.url.path, "database unavailable"), status_code=503,
                    headers=RETRY_AFTER)


def database_refused(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """Exception handler: a parameter PostgreSQL cannot take is the client's.

    Parameters are checked before they reach the database (query_text); this is the net
    behind that, in our own words (the database's message names its internals).
    """
    return error(422, f"a parameter the database cannot take: text {UNSTORABLE}")


def invalid_request(request: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    """Litestar's own validation (a JSON body of the wrong shape) in the project's error shape."""
    problems = "; ".join(str(item.get("message", item)) if isinstance(item, dict) else str(item)
                         for item in (exc.extra or []) if item) if isinstance(exc.extra, list) \
        else ""
    if "unknown field `scope`" in problems:
        # The command line's spelling (`--scope ingest,read`) sent over HTTP.
        problems += ('; the field is "scopes", a list: {"name": "ward-3", "scopes": ["ingest",'
                     ' "read"], "prefix": "ward-3:"} (prefix optional)')
    return error(400, f"{exc.detail}: {problems}" if problems else str(exc.detail))
