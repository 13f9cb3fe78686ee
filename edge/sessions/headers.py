"""Response headers that tell a client what happened to its session."""

from __future__ import annotations

from edge.sessions.cookies import set_cookie
from edge.sessions.placement import Placement

SESSION_HEADER = "x-ark-session"


def session_headers(placement: Placement | None, *, secure: bool, max_age: int) -> dict[str, str]:
    """`set-cookie` for a new session and `x-ark-session: new|resumed`; nothing for a stateless request."""
    if placement is None:
        return {}
    if placement.is_new:
        return {SESSION_HEADER: "new", "set-cookie": set_cookie(placement.session_id, secure=secure, max_age=max_age)}
    return {SESSION_HEADER: "resumed"}
