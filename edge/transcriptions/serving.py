"""Serving logic for transcriptions: one validated request, rendered in the asked format or as SSE events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ark.transcription.v1 import transcription_service_pb2 as pb
from edge import sse
from edge.catalog import Catalog
from edge.clients.transcription import TranscriptionBackend, TranscriptionStream
from edge.compat import TRANSCRIPTIONS, apply_policy
from edge.transcriptions import translate
from edge.transcriptions.schemas import TranscriptionRequest
from services.common.config import Capability
from services.common.errors import ArkError, InternalError, InvalidRequestError

# Formats whose content is the transcript alone, so that it can be streamed as text events.
STREAMABLE_FORMATS = ("json", "text")


@dataclass(frozen=True, slots=True)
class Prepared:
    """A validated request, ready to run."""

    request_id: str
    audio: bytes
    options: pb.TranscriptionOptions
    response_format: str
    granularities: frozenset[str]
    stream: bool
    ignored_params: list[str]


@dataclass(frozen=True, slots=True)
class Rendered:
    """A finished transcription in the format the client asked for."""

    body: str | dict[str, Any]
    media_type: str


_MEDIA_TYPES = {"text": "text/plain; charset=utf-8", "srt": "text/plain; charset=utf-8", "vtt": "text/vtt"}


class Transcriptions:
    def __init__(self, catalog: Catalog, backend: TranscriptionBackend) -> None:
        self._catalog = catalog
        self._backend = backend

    def admit(self) -> None:
        """Refuse at once, before the upload is read, while the service is known to be saturated (429)."""
        self._backend.refuse_if_saturated()

    def prepare(self, body: TranscriptionRequest, *, request_id: str) -> Prepared:
        model = self._catalog.resolve(body.model, Capability.TRANSCRIPTION)
        ignored = apply_policy(TRANSCRIPTIONS, body)
        response_format = body.response_format or "json"
        if response_format == "diarized_json":
            raise InvalidRequestError(
                "response_format 'diarized_json' needs speaker diarization, which ARK does not offer; use "
                "json, text, srt, vtt or verbose_json.",
                param="response_format",
                code="unsupported_value",
            )
        granularities = frozenset(body.timestamp_granularities or ["segment"])
        if "word" in granularities and response_format != "verbose_json":
            raise InvalidRequestError(
                "Word timestamps (timestamp_granularities: ['word']) require response_format 'verbose_json'.",
                param="timestamp_granularities",
            )
        if body.stream and response_format not in STREAMABLE_FORMATS:
            raise InvalidRequestError(
                f"stream=true sends transcript.text events, which cannot carry response_format '{response_format}'; "
                "use json or text, or do not stream.",
                param="response_format",
            )
        options = translate.options_to_proto(body, model_id=model.id, granularities=granularities)
        return Prepared(request_id, body.file, options, response_format, granularities, bool(body.stream), ignored)

    async def complete(self, job: Prepared) -> Rendered:
        """Transcribe the whole file and render it."""
        response = await self._backend.transcribe(
            pb.TranscribeRequest(request_id=job.request_id, audio=job.audio, options=job.options)
        )
        fmt = job.response_format
        if fmt == "verbose_json":
            return Rendered(translate.to_verbose_json(response, job.granularities), "application/json")
        if fmt == "text":
            return Rendered(translate.to_text(response), _MEDIA_TYPES[fmt])
        if fmt == "srt":
            return Rendered(translate.to_srt(response), _MEDIA_TYPES[fmt])
        if fmt == "vtt":
            return Rendered(translate.to_vtt(response), _MEDIA_TYPES[fmt])
        return Rendered(translate.to_json(response), "application/json")

    async def open_stream(self, job: Prepared) -> AsyncIterator[bytes]:
        """Start transcribing now (a bad file is refused here, before any byte is sent); returns the SSE body."""
        stream = await self._backend.open_stream(
            pb.StreamTranscribeRequest(request_id=job.request_id, audio=job.audio, options=job.options)
        )
        return self._sse_events(stream)

    async def _sse_events(self, stream: TranscriptionStream) -> AsyncIterator[bytes]:
        deltas = translate.TextDeltas()
        try:
            async for message in stream:
                kind = message.WhichOneof("event")
                if kind == "segment":
                    if delta := deltas.push(message.segment.text):
                        yield sse.frame(translate.delta_event(delta))
                elif kind == "finished":
                    yield sse.frame(translate.done_event(deltas.text, message.finished.usage))
                    return
            raise InternalError("The transcription service ended the stream without finishing.")
        except ArkError as exc:
            yield sse.frame(exc.to_dict())
        finally:
            # Runs on client disconnect too (the task is cancelled): cancelling the call stops transcription.
            stream.cancel()
