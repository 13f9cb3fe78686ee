"""HTTP glue for POST /v1/audio/transcriptions."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from edge import sse
from edge.dependencies import Ctx, State, TranscriptionsDep
from edge.transcriptions.multipart import read_transcription_request

router = APIRouter()


@router.post("/v1/audio/transcriptions", response_model=None)
async def create_transcription(request: Request, ctx: Ctx, state: State, transcriptions: TranscriptionsDep) -> Response:
    transcriptions.admit()  # saturated: 429 before reading up to 25 MB
    body = await read_transcription_request(request, max_file_bytes=state.config.limits.max_audio_bytes)
    job = transcriptions.prepare(body, request_id=ctx.request_id)
    headers = {"x-ark-ignored-params": ",".join(job.ignored_params)} if job.ignored_params else {}
    if job.stream:
        events = await transcriptions.open_stream(job)
        headers |= sse.HEADERS
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)
    rendered = await transcriptions.complete(job)
    if isinstance(rendered.body, dict):
        return JSONResponse(rendered.body, headers=headers)
    return Response(rendered.body, media_type=rendered.media_type, headers=headers)
