"""What the transcription service computes, free of gRPC and of any engine library.

The servicer turns protos into these types and back; engines consume `DecodedAudio` and `DecodeOptions` and produce
`Segment`s and `Finished`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Whisper's native input: 16 kHz mono float32 in [-1, 1]; the encoder covers 50 positions per second.
SAMPLE_RATE = 16_000
AUDIO_TOKENS_PER_SECOND = 50


@dataclass(frozen=True, slots=True)
class VoiceActivity:
    """Cut silence out before decoding; None fields take the engine's defaults."""

    threshold: float | None = None
    prefix_padding_ms: int | None = None
    silence_duration_ms: int | None = None


@dataclass(frozen=True, slots=True)
class TranscriptionRequest:
    """One file to transcribe, as the client asked for it (model aliases already resolved)."""

    request_id: str
    model: str
    audio: bytes
    language: str = ""  # ISO-639-1; empty means "let the model tell"
    languages: tuple[str, ...] = ()
    prompt: str = ""
    keywords: tuple[str, ...] = ()
    temperature: float | None = None  # None or 0: the model's fallback schedule
    word_timestamps: bool = False
    voice_activity: VoiceActivity | None = None


@dataclass(frozen=True, slots=True)
class DecodedAudio:
    """PCM ready for the model."""

    samples: np.ndarray  # float32, mono, SAMPLE_RATE
    container: str  # FFmpeg demuxer that read it

    @property
    def duration_seconds(self) -> float:
        return len(self.samples) / SAMPLE_RATE


@dataclass(frozen=True, slots=True)
class DecodeOptions:
    """What an engine needs besides the audio; validated against its capabilities beforehand."""

    language: str  # resolved: the model is told, never left to guess what the service checked
    prompt: str = ""
    keywords: tuple[str, ...] = ()
    temperature: float | None = None
    word_timestamps: bool = False
    voice_activity: VoiceActivity | None = None


@dataclass(frozen=True, slots=True)
class Word:
    word: str
    start: float
    end: float


@dataclass(frozen=True, slots=True)
class Segment:
    """A stretch of transcript with Whisper's own quality signals (OpenAI's `verbose_json` segment)."""

    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: tuple[int, ...]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    words: tuple[Word, ...] = ()


@dataclass(frozen=True, slots=True)
class Usage:
    input_text_tokens: int
    input_audio_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class Started:
    """The audio decoded and the request was accepted; segments follow."""

    language: str
    duration_seconds: float


@dataclass(frozen=True, slots=True)
class Finished:
    text: str
    duration_seconds: float
    usage: Usage


TranscriptionEvent = Started | Segment | Finished


def join_segments(texts: list[str]) -> str:
    """The transcript as OpenAI returns it: segment texts concatenated, outer whitespace removed."""
    return "".join(texts).strip()
