"""Who is calling: a bearer token maps to a user; each user sees only their own jobs.

Why: seed 004's `user_id` isolation. With no tokens configured the service runs for one
local user (and `ServerSettings.check` keeps it on localhost). A token in a URL ends up in
proxy logs, browser history and Referer headers, so `?access_token=` is taken only where
there is no other way: the GET stream, which a browser's EventSource opens without headers.
The scheme name is case-insensitive (RFC 9110): `bearer` works as well as `Bearer`.
"""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request

LOCAL_USER = "local"


def user_for(request: Request, *, token_in_query: bool = False) -> str:
    """The user id of this request, or 401. `token_in_query`: `?access_token=` counts too
    (only the GET stream says so)."""
    settings = request.app.state.settings
    if settings.single_user:
        return LOCAL_USER
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer" and token:
        for known, user in settings.tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                return user
    query = request.query_params.get("access_token")
    if query and token_in_query:
        for known, user in settings.tokens.items():
            if hmac.compare_digest(known.encode(), query.encode()):
                return user
    detail = "missing or unknown API token: send `Authorization: Bearer <token>`"
    if query and not token_in_query:
        detail += (
            "; `?access_token=` is accepted only on GET /api/job/{id}/stream (for "
            "EventSource), never elsewhere"
        )
    raise HTTPException(status_code=401, detail=detail, headers={"WWW-Authenticate": "Bearer"})
