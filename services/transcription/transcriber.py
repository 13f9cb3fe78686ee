"""One transcription, whatever the engine: check the request, queue for the engine, decode, stream the result.

Everything an engine should never see is handled here once: the byte limit, languages the model cannot transcribe,
options the engine cannot honour, and the upload itself (decoded from memory, bounded in duration). Checks that
need no decoding run before the request queues; decoding runs while holding the engine's slot, so that at most
one decoded file per model sits in memory, however many requests wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from services.common.admission import Admission
from services.common.config import LimitsConfig
from services.common.errors import InternalError, InvalidRequestError, RequestTooLargeError, UnsupportedParameterError
from services.transcription import audio
from services.transcription.domain import (
    DecodeOptions,
    Finished,
    Segment,
    Started,
    TranscriptionEvent,
    TranscriptionRequest,
    Usage,
    join_segments,
)
from services.transcription.engines.base import TranscriptionEngine
from services.transcription.languages import WHISPER_LANGUAGES, language_name


class Transcriber:
    """Serves one model: its engine behind a bounded FIFO queue, plus the checks every engine shares."""

    def __init__(self, engine: TranscriptionEngine, limits: LimitsConfig) -> None:
        self.engine = engine
        self._max_bytes = limits.max_audio_bytes
        self._max_seconds = limits.max_audio_seconds
        # Refused for load before the audio is decoded (decoding happens while holding the slot).
        self._admission = Admission(
            slots=1, max_queue=engine.max_queue, max_wait_seconds=limits.max_queue_wait_seconds, name=engine.model_id
        )

    @property
    def admission(self) -> Admission:
        """The queue for this model's engine (closed by the server when the service stops)."""
        return self._admission

    def options(self, request: TranscriptionRequest) -> DecodeOptions:
        """Validate a request against the limits and the engine's capabilities; raises InvalidRequestError."""
        if len(request.audio) > self._max_bytes:
            raise RequestTooLargeError(
                f"Maximum content size limit ({self._max_bytes}) exceeded ({len(request.audio)} bytes read).",
                param="file",
            )
        if request.temperature is not None and not 0 <= request.temperature <= 1:
            raise InvalidRequestError("temperature must be between 0 and 1.", param="temperature")
        capabilities = self.engine.capabilities
        if request.word_timestamps and not capabilities.word_timestamps:
            raise UnsupportedParameterError(
                f"The model `{request.model}` cannot produce word timestamps.", param="timestamp_granularities"
            )
        if request.voice_activity is not None and not capabilities.voice_activity_detection:
            raise UnsupportedParameterError(
                f"The model `{request.model}` cannot do voice activity detection.", param="chunking_strategy"
            )
        return DecodeOptions(
            language=resolve_language(request, capabilities.languages),
            prompt=request.prompt,
            keywords=request.keywords,
            temperature=request.temperature,
            word_timestamps=request.word_timestamps,
            voice_activity=request.voice_activity,
        )

    async def transcribe(self, request: TranscriptionRequest) -> AsyncIterator[TranscriptionEvent]:
        """`Started` once the audio decoded, the segments as they are recognised, then `Finished`."""
        options = self.options(request)
        async with self._admission.slot():
            decoded = await asyncio.to_thread(audio.decode, request.audio, max_seconds=self._max_seconds)
            events = self.engine.transcribe(decoded, options)
            texts: list[str] = []
            try:
                async for event in events:
                    if isinstance(event, Segment):
                        texts.append(event.text)
                        yield event
                    elif isinstance(event, Started):
                        yield Started(event.language, decoded.duration_seconds)
                    elif isinstance(event, Usage):
                        yield Finished(join_segments(texts), decoded.duration_seconds, event)
                        return
            finally:
                # A client disconnect arrives here as CancelledError: closing the engine's stream stops it.
                await events.aclose()
        raise InternalError(f"engine {self.engine.model_id} ended without reporting usage")

    async def close(self) -> None:
        await self.engine.close()


def resolve_language(request: TranscriptionRequest, supported: frozenset[str]) -> str:
    """The language to decode in ("" = let the model detect it), after refusing codes the model cannot handle."""
    language = request.language.strip().lower()
    languages = tuple(code.strip().lower() for code in request.languages)
    for param, code in [("language", language), *(("languages", c) for c in languages)]:
        if not code:
            continue
        if code not in WHISPER_LANGUAGES:
            raise InvalidRequestError(
                f"Invalid language '{code}'. Language parameter must be specified in ISO-639-1 format.",
                param=param,
                code="invalid_language_format",
            )
        if code not in supported:
            raise InvalidRequestError(
                _unsupported_language(request.model, code, supported), param=param, code="unsupported_language"
            )
    if language:
        return language
    if len(set(languages)) == 1:
        return languages[0]
    return next(iter(supported)) if len(supported) == 1 else ""


def _unsupported_language(model: str, code: str, supported: frozenset[str]) -> str:
    name = language_name(code).title()
    if supported == {"en"}:
        return (
            f"The model `{model}` is English-only: it cannot transcribe {name} ('{code}'). "
            "Omit `language` or set it to 'en', or configure a multilingual model."
        )
    return f"The model `{model}` cannot transcribe {name} ('{code}')."
