"""The `ark_session_id` cookie, exactly as the session contract specifies it."""

from __future__ import annotations

import uuid

COOKIE_NAME = "ark_session_id"


def parse_session_id(value: str | None) -> str | None:
    """The session id if `value` is a canonical uuid4, else None (malformed ids are never looked up)."""
    if not value or len(value) != 36:
        return None
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        return None
    return value if parsed.version == 4 and str(parsed) == value else None


def set_cookie(session_id: str, *, secure: bool, max_age: int) -> str:
    """The cookie of a new session; it lives as long as the session may (`sessions.max_age_seconds`), so that a
    client never keeps presenting a session the registry has already expired for age."""
    value = f"{COOKIE_NAME}={session_id}; Max-Age={max_age}; Path=/; SameSite=lax; HttpOnly"
    return value + "; Secure" if secure else value


def expire_cookie(*, secure: bool) -> str:
    value = f"{COOKIE_NAME}=; Max-Age=0; Path=/; SameSite=lax; HttpOnly"
    return value + "; Secure" if secure else value
