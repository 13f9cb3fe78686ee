"""The checks every engine shares, against a fake engine: limits, languages, capabilities, order of events."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from services.common.config import LimitsConfig
from services.common.errors import InvalidRequestError, RequestTooLargeError, UnsupportedParameterError
from services.transcription.domain import (
    DecodedAudio,
    DecodeOptions,
    Finished,
    Segment,
    Started,
    TranscriptionRequest,
    Usage,
    VoiceActivity,
)
from services.transcription.engines.base import EngineCapabilities, EngineEvent, TranscriptionEngine
from services.transcription.transcriber import Transcriber
from tests.support.audio import encode_as, tone

WAV = encode_as(tone(2.0), "wav")


class FakeEngine(TranscriptionEngine):
    def __init__(self, capabilities: EngineCapabilities, *, pause: float = 0.0) -> None:
        self.model_id = "fake"
        self.capabilities = capabilities
        self.calls: list[DecodeOptions] = []
        self.closed_streams = 0
        self._pause = pause

    async def transcribe(self, audio: DecodedAudio, options: DecodeOptions) -> AsyncIterator[EngineEvent]:
        self.calls.append(options)
        try:
            yield Started(options.language or "en", 0.0)
            for i, text in enumerate([" Hello", " world."]):
                await asyncio.sleep(self._pause)
                yield Segment(i, 0, i, i + 1.0, text, (1, 2), 0.0, -0.1, 1.0, 0.01)
            yield Usage(0, 100, 4)
        finally:
            self.closed_streams += 1


ENGLISH = EngineCapabilities(frozenset({"en"}), word_timestamps=True, voice_activity_detection=True)
MULTI = EngineCapabilities(frozenset({"en", "fr", "de"}), word_timestamps=False, voice_activity_detection=False)
LIMITS = LimitsConfig(max_audio_bytes=1_000_000, max_audio_seconds=10)


def request(**kw) -> TranscriptionRequest:
    return TranscriptionRequest(**{"request_id": "r", "model": "whisper-tiny.en", "audio": WAV, **kw})


async def collect(transcriber: Transcriber, req: TranscriptionRequest) -> list:
    return [event async for event in transcriber.transcribe(req)]


async def test_events_are_started_segments_finished_with_the_joined_text():
    events = await collect(Transcriber(FakeEngine(ENGLISH), LIMITS), request())
    assert [type(e) for e in events] == [Started, Segment, Segment, Finished]
    assert events[0].duration_seconds == pytest.approx(2.0)  # measured from the decoded audio, not trusted
    assert events[-1].text == "Hello world." and events[-1].usage.output_tokens == 4


async def test_english_only_model_refuses_french_and_says_why():
    engine = FakeEngine(ENGLISH)
    with pytest.raises(InvalidRequestError, match="English-only") as info:
        await collect(Transcriber(engine, LIMITS), request(language="fr"))
    assert info.value.param == "language" and info.value.code == "unsupported_language"
    assert "French" in info.value.message and not engine.calls


async def test_malformed_language_code_is_invalid():
    with pytest.raises(InvalidRequestError, match="ISO-639-1") as info:
        await collect(Transcriber(FakeEngine(ENGLISH), LIMITS), request(language="english"))
    assert info.value.code == "invalid_language_format"


async def test_language_is_resolved_before_the_engine_sees_it():
    engine = FakeEngine(ENGLISH)
    await collect(Transcriber(engine, LIMITS), request())
    await collect(Transcriber(engine, LIMITS), request(language="EN"))
    assert [c.language for c in engine.calls] == ["en", "en"]
    multi = FakeEngine(MULTI)
    await collect(Transcriber(multi, LIMITS), request())
    await collect(Transcriber(multi, LIMITS), request(languages=("de",)))
    assert [c.language for c in multi.calls] == ["", "de"]  # detect; a single candidate acts as `language`
    with pytest.raises(InvalidRequestError) as info:
        await collect(Transcriber(FakeEngine(ENGLISH), LIMITS), request(languages=("en", "de")))
    assert info.value.param == "languages"


async def test_options_the_engine_cannot_honour_are_refused_naming_the_openai_field():
    transcriber = Transcriber(FakeEngine(MULTI), LIMITS)
    with pytest.raises(UnsupportedParameterError) as info:
        await collect(transcriber, request(word_timestamps=True))
    assert info.value.param == "timestamp_granularities"
    with pytest.raises(UnsupportedParameterError) as info:
        await collect(transcriber, request(voice_activity=VoiceActivity()))
    assert info.value.param == "chunking_strategy"


async def test_limits():
    small = Transcriber(FakeEngine(ENGLISH), LimitsConfig(max_audio_bytes=1000, max_audio_seconds=10))
    with pytest.raises(RequestTooLargeError) as info:
        await collect(small, request())
    assert info.value.http_status == 413 and info.value.param == "file"
    short = Transcriber(FakeEngine(ENGLISH), LimitsConfig(max_audio_seconds=1))
    with pytest.raises(InvalidRequestError, match="too long"):
        await collect(short, request())


async def test_bad_audio_never_reaches_the_engine():
    engine = FakeEngine(ENGLISH)
    with pytest.raises(InvalidRequestError) as info:
        await collect(Transcriber(engine, LIMITS), request(audio=WAV[: len(WAV) // 3]))
    assert info.value.param == "file" and not engine.calls


async def test_cancelling_a_consumer_closes_the_engine_stream_and_frees_the_slot():
    engine = FakeEngine(ENGLISH, pause=10)
    transcriber = Transcriber(engine, LIMITS)

    async def first_event() -> None:
        async with contextlib.aclosing(transcriber.transcribe(request())) as events:  # as the servicer does
            async for _ in events:
                await asyncio.sleep(10)

    task = asyncio.create_task(first_event())
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.closed_streams == 1
    engine._pause = 0
    assert len(await asyncio.wait_for(collect(transcriber, request()), 5)) == 4  # the slot was released
