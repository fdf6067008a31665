"""Who is calling: a bearer token maps to a user; each user sees only their own jobs.

Why: seed 004's `user_id` isolation. With no tokens configured the service runs for one
local user (and `ServerSettings.check` keeps it on localhost).
"""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request

LOCAL_USER = "local"


def user_for(request: Request) -> str:
    """The user id of this request, or 401."""
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
    # Browsers' EventSource cannot send headers: the web page may pass ?access_token=.
    query = request.query_params.get("access_token")
    if query:
        for known, user in settings.tokens.items():
            if hmac.compare_digest(known.encode(), query.encode()):
                return user
    raise HTTPException(
        status_code=401,
        detail="missing or unknown API token: send `Authorization: Bearer <token>`",
        headers={"WWW-Authenticate": "Bearer"},
    )
