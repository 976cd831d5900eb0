"""Key management over HTTP (`admin` scope): create, list, revoke.

A key cannot mint a key that reaches further than itself: the new key's scopes are a subset
of its own, and its prefix lies within its own. An admin key bound to a prefix sees and revokes
only keys within that prefix, and learns nothing about others: names are unique only among
active keys of the same prefix, so a name taken outside is no obstacle (nor a hint).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.exceptions import NotFoundException
from litestar.params import FromPath, JSONBody, QueryParameter

from vitalstore import keys
from vitalstore.api.common import error, query_int, query_text, services_of
from vitalstore.api.responses import RetryAfterOperation, errors
from vitalstore.auth import requires
from vitalstore.keys import ApiKey, KeyInfo

AdminRequest = Request[Any, ApiKey, Any]


class NewKey(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    scopes: list[str]
    prefix: str | None = None


class CreatedKey(msgspec.Struct):
    id: int  # never reused: log lines and rate-limit counts carry it
    name: str
    scopes: list[str]
    prefix: str | None
    created_at: datetime
    key: str  # shown once: only its hash is stored


class KeyList(msgspec.Struct):
    items: list[KeyInfo]


@post("/v1/keys", status_code=201, summary="Create an API key; the key is in this answer only",
      operation_class=RetryAfterOperation, responses=errors(400, 401, 403, 422, 503),
      **requires("admin"))
async def create_key(request: AdminRequest, state: State, data: JSONBody[NewKey]
                     ) -> Response[CreatedKey]:
    """Create a key with `scopes` (ingest, read, admin) and an optional device `prefix`.

    The answer holds the key itself, once: only its SHA-256 is stored.
    """
    admin = request.auth
    if not (data.prefix or "").startswith(admin.prefix):
        return error(403, f"this key manages only keys within prefix {admin.prefix!r}")
    services = services_of(state)
    keys.check_spec(data.name, data.scopes, data.prefix)  # unknown scopes are 422, not 403
    beyond = sorted(set(data.scopes) - admin.scopes)
    if beyond:
        return error(403, f"this key cannot give scopes it lacks: {', '.join(beyond)}")
    # An InvalidKeySpec (a Problem) answers 422 through the app's handler.
    key, info = await keys.create(services.pool, data.name, data.scopes, data.prefix)
    return Response(CreatedKey(info.id, info.name, info.scopes, info.prefix, info.created_at,
                               key), status_code=201)


@get("/v1/keys", summary="API keys (never the keys themselves), revoked ones included",
     operation_class=RetryAfterOperation, responses=errors(401, 403, 503),
     **requires("admin"))
async def list_keys(request: AdminRequest, state: State) -> KeyList:
    """Every key's name, scopes, prefix, creation and revocation time; never a key."""
    return KeyList(await keys.list_all(services_of(state).pool, within=request.auth.prefix))


@delete("/v1/keys/{name:str}", status_code=204,
        summary="Revoke the active key of that name (`id` when several have it)",
        operation_class=RetryAfterOperation, responses=errors(401, 403, 404, 409, 422, 503),
        **requires("admin"))
async def revoke_key(request: AdminRequest, state: State, name: FromPath[str],
                     key_id: Annotated[str | None,
                                       QueryParameter(name="id", required=False)] = None
                     ) -> None:
    """Revoke the active key of that name; it is refused everywhere within the key cache time."""
    # `-> None`: a 204 that documents no body (a Response return would document JSON).
    services = services_of(state)
    # A BadQuery (422) or an AmbiguousName (409) answers through the app's handler.
    revoked = await keys.revoke(services.pool, query_text("name", name),
                                within=request.auth.prefix,
                                key_id=query_int("id", key_id, 0, 1, 2**31 - 1) or None)
    if revoked is None:
        raise NotFoundException(f"no active key named {name!r}")
    # At once in this process; other processes drop it when their cache entry expires.
    services.keys.forget(revoked)


ROUTES = [create_key, list_keys, revoke_key]
