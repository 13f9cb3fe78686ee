"""The narrow interface every speech-to-text engine implements (faster-whisper on CPU, TensorRT-LLM on GPU).

The service depends on this ABC only: decoding uploads, limits and language checks live above it and are shared by
every engine, and the serving logic can be tested against a fake.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass

from services.transcription.domain import DecodedAudio, DecodeOptions, Segment, Started, Usage

EngineEvent = Started | Segment | Usage


@dataclass(frozen=True, slots=True)
class EngineCapabilities:
    """What an engine can honour; a request asking for more is refused before any work is done."""

    languages: frozenset[str]  # ISO-639-1 codes the model transcribes
    word_timestamps: bool
    voice_activity_detection: bool


class TranscriptionEngine(ABC):
    """Transcribes decoded audio for one model, one request at a time (the service queues the rest)."""

    model_id: str
    capabilities: EngineCapabilities
    # Requests allowed to wait for the engine before new ones are refused with 429.
    max_queue: int = 16

    @abstractmethod
    def transcribe(self, audio: DecodedAudio, options: DecodeOptions) -> AsyncIterator[EngineEvent]:
        """Stream `Started` (language, duration), then `Segment`s in order (ids from 0), then one `Usage`.

        Closing the iterator (or cancelling the task consuming it) stops the computation at the next segment.
        """

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release engine resources."""
