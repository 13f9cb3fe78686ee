"""HTTP glue for POST /v1/chat/completions."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from edge import sse
from edge.chat.schemas import ChatCompletionRequest
from edge.dependencies import Chat, Ctx, SessionCookie, State, json_body
from edge.sessions.headers import session_headers

router = APIRouter()


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(
    request: Request,
    body: Annotated[ChatCompletionRequest, json_body(ChatCompletionRequest)],
    ctx: Ctx,
    chat: Chat,
    state: State,
    session_cookie: SessionCookie = None,
) -> Response:
    job = chat.prepare(body, request_id=ctx.request_id, api_key_hash=ctx.api_key_hash)
    running = await chat.start(job, session_cookie)
    headers = session_headers(
        running.session, secure=state.config.edge.tls, max_age=state.config.sessions.max_age_seconds
    )
    if job.ignored_params:
        headers["x-ark-ignored-params"] = ",".join(job.ignored_params)
    if body.stream:
        headers |= sse.HEADERS
        return StreamingResponse(chat.sse_events(job, running), media_type="text/event-stream", headers=headers)
    completion = await chat.complete(job, running, request.receive)
    if completion is None:  # the client went away: nobody reads this
        return Response(status_code=499)
    return JSONResponse(completion, headers=headers)
