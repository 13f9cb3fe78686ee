"""Response headers that tell a client what happened to its session."""

from __future__ import annotations

import hashlib

from edge.sessions.cookies import set_cookie
from edge.sessions.placement import Placement

SESSION_HEADER = "x-ark-session"
# Which worker incarnation served the request, as an opaque id (`<worker>.<epoch>`): equal on every turn of a
# conversation that kept its state; a new epoch means the worker restarted and the state was recomputed.
WORKER_HEADER = "x-ark-worker"


def worker_id(placement: Placement) -> str:
    """Opaque: clients can compare it, not learn internal addresses from it."""
    return f"{hashlib.sha256(placement.worker_name.encode()).hexdigest()[:12]}.{placement.worker_epoch}"


def session_headers(placement: Placement | None, *, secure: bool, max_age: int) -> dict[str, str]:
    """`set-cookie` for a new session and `x-ark-session: new|resumed`; nothing for a stateless request."""
    if placement is None:
        return {}
    worker = {WORKER_HEADER: worker_id(placement)}
    if placement.is_new:
        cookie = set_cookie(placement.session_id, secure=secure, max_age=max_age)
        return {**worker, SESSION_HEADER: "new", "set-cookie": cookie}
    return {**worker, SESSION_HEADER: "resumed"}
