"""HTTP glue for POST /v1/chat/completions."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response, StreamingResponse

from edge.chat.schemas import ChatCompletionRequest
from edge.dependencies import Chat, Ctx, json_body

router = APIRouter()


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(
    body: Annotated[ChatCompletionRequest, json_body(ChatCompletionRequest)], ctx: Ctx, chat: Chat
) -> Response:
    job = chat.prepare(body, request_id=ctx.request_id, api_key_hash=ctx.api_key_hash)
    headers = {"x-ark-ignored-params": ",".join(job.ignored_params)} if job.ignored_params else {}
    if body.stream:
        events = await chat.open_stream(job)
        headers |= {"cache-control": "no-cache", "x-accel-buffering": "no"}
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)
    return JSONResponse(await chat.complete(job), headers=headers)
