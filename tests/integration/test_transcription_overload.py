"""A saturated transcription service, seen from the edge: refused for load before the upload is read.

A real TranscriptionService in-process (servicer, Transcriber with its admission, real audio decoding) over a fake
engine that holds the only slot; the edge's real TranscriptionBackend talks to it over gRPC.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from ark.transcription.v1 import transcription_service_pb2 as pb
from edge.clients.transcription import TranscriptionBackend
from services.common.config import LimitsConfig
from services.common.errors import OverloadedError
from services.common.server import create_server, mark_serving
from services.transcription.domain import DecodedAudio, DecodeOptions, Segment, Started, Usage
from services.transcription.engines.base import EngineCapabilities, TranscriptionEngine
from services.transcription.servicer import transcription_service
from services.transcription.transcriber import Transcriber
from tests.support.audio import encode, tone

pytestmark = pytest.mark.integration


class HeldEngine(TranscriptionEngine):
    """Transcribes anything as "held" once `release` is set."""

    model_id = "held"
    capabilities = EngineCapabilities(frozenset({"en"}), word_timestamps=False, voice_activity_detection=False)
    max_queue = 0  # one at a time, nobody waits

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.calls = 0

    async def transcribe(self, audio: DecodedAudio, options: DecodeOptions) -> AsyncIterator:
        self.calls += 1
        self.started.set()
        yield Started("en", audio.duration_seconds)
        await self.release.wait()
        yield Segment(0, 0, 0.0, audio.duration_seconds, "held", (), 0.0, 0.0, 1.0, 0.0)
        yield Usage(0, 1, 1)


async def test_after_a_refusal_for_load_the_edge_refuses_uploads_without_sending_them():
    engine = HeldEngine()
    service = transcription_service({"held": Transcriber(engine, LimitsConfig(max_queue_wait_seconds=5))})
    server, port, health = create_server([service], "127.0.0.1:0")
    await server.start()
    await mark_serving(health, [service.name])
    backend = TranscriptionBackend(f"127.0.0.1:{port}")
    audio = encode(tone(1.0), "wav", "pcm_s16le")
    request = pb.TranscribeRequest(request_id="r", audio=audio, options=pb.TranscriptionOptions(model="held"))
    try:
        backend.refuse_if_saturated()  # nothing known yet: no refusal
        first = asyncio.create_task(backend.transcribe(request))
        await asyncio.wait_for(engine.started.wait(), 10)
        with pytest.raises(OverloadedError) as refused:  # the service refuses: its only slot is taken
            await backend.transcribe(request)
        assert refused.value.retry_after >= 1
        # From now until the Retry-After passes, the edge refuses on its own, before reading an upload.
        with pytest.raises(OverloadedError) as early:
            backend.refuse_if_saturated()
        assert early.value.http_status == 429 and early.value.retry_after >= 1
        engine.release.set()
        assert (await first).text == "held"
        assert engine.calls == 1
    finally:
        engine.release.set()
        await backend.close()
        await server.stop(None)
