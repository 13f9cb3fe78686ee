"""ARK extension endpoints: inspect and end the caller's current session (`ark_session_id` cookie)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from edge.dependencies import Ctx, SessionCookie, State
from edge.errors import error_response
from edge.sessions.cookies import expire_cookie
from services.common.errors import NotFoundError

router = APIRouter()


def _not_found(enabled: bool) -> NotFoundError:
    message = "No active session." if enabled else "Sessions are disabled on this server."
    return NotFoundError(message, code="session_not_found")


@router.get("/v1/sessions/current", response_model=None)
async def get_current_session(ctx: Ctx, state: State, session_cookie: SessionCookie = None) -> Any:
    session = await state.sessions.lookup(session_cookie, ctx.api_key_hash)
    if session is None:
        return error_response(_not_found(state.sessions.enabled))
    return {
        "id": session.id,
        "object": "session",
        "model": session.model,
        "created_at": session.create_time.seconds,
        "last_used_at": session.last_use_time.seconds,
        "expires_at": session.expire_time.seconds,
        "idle_timeout_seconds": state.config.sessions.idle_timeout_seconds,
    }


@router.delete("/v1/sessions/current", response_model=None)
async def delete_current_session(ctx: Ctx, state: State, session_cookie: SessionCookie = None) -> JSONResponse:
    """End the session: the worker frees its state and the cookie is expired (also when nothing was found)."""
    expired = {"set-cookie": expire_cookie(secure=state.config.edge.tls)}
    session = await state.sessions.lookup(session_cookie, ctx.api_key_hash)
    if session is None:
        response = error_response(_not_found(state.sessions.enabled))
        response.headers.update(expired)
        return response
    await state.sessions.end(session.id, ctx.api_key_hash)
    return JSONResponse({"id": session.id, "object": "session.deleted", "deleted": True}, headers=expired)
