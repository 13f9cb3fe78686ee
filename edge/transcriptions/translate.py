"""Pure translation between OpenAI's transcription shapes and ARK's protos: the request options, the five response
formats (json, text, srt, vtt, verbose_json) and the stream events. No I/O, so every format is unit-tested alone."""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

from ark.transcription.v1 import transcription_service_pb2 as pb
from edge.proto_ranges import check_integer
from edge.transcriptions.schemas import TranscriptionRequest
from services.transcription.languages import language_name

# Integer fields of `chunking_strategy` and the TranscriptionOptions field each is sent in (range-checked).
VAD_INTEGERS = {
    "prefix_padding_ms": "voice_activity_detection.prefix_padding_ms",
    "silence_duration_ms": "voice_activity_detection.silence_duration_ms",
}
_GRANULARITIES = {"segment": pb.TIMESTAMP_GRANULARITY_SEGMENT, "word": pb.TIMESTAMP_GRANULARITY_WORD}


def options_to_proto(
    body: TranscriptionRequest, *, model_id: str, granularities: Iterable[str]
) -> pb.TranscriptionOptions:
    """The engine-facing options of a validated request (model alias already resolved to `model_id`)."""
    options = pb.TranscriptionOptions(
        model=model_id,
        language=body.language or "",
        prompt=body.prompt or "",
        timestamp_granularities=[_GRANULARITIES[g] for g in sorted(set(granularities))],
        languages=body.languages or [],
        keywords=body.keywords or [],
    )
    if body.temperature is not None:
        options.temperature = body.temperature
    strategy = body.chunking_strategy
    if strategy == "auto":
        options.voice_activity_detection.SetInParent()  # engine defaults, tuned for whole files
    elif strategy is not None:
        for name, field in VAD_INTEGERS.items():
            check_integer(
                getattr(strategy, name),
                param=f"chunking_strategy.{name}",
                message=pb.TranscriptionOptions.DESCRIPTOR,
                field=field,
            )
        options.voice_activity_detection.threshold = strategy.threshold
        options.voice_activity_detection.prefix_padding_ms = strategy.prefix_padding_ms
        options.voice_activity_detection.silence_duration_ms = strategy.silence_duration_ms
    return options


# -- whole responses ---------------------------------------------------------------------------------------------


def duration_usage(seconds: float) -> dict[str, Any]:
    """OpenAI bills whisper-1 by the second, rounded up."""
    return {"type": "duration", "seconds": math.ceil(seconds)}


def to_json(response: pb.TranscribeResponse) -> dict[str, Any]:
    return {"text": response.text, "usage": duration_usage(response.duration_seconds)}


def to_verbose_json(response: pb.TranscribeResponse, granularities: Iterable[str]) -> dict[str, Any]:
    wanted = set(granularities)
    body: dict[str, Any] = {
        "task": "transcribe",
        "language": language_name(response.language),
        "duration": response.duration_seconds,
        "text": response.text,
    }
    if "word" in wanted:
        body["words"] = words(response.segments)
    if "segment" in wanted:
        body["segments"] = [_segment(s) for s in response.segments]
    body["usage"] = duration_usage(response.duration_seconds)
    return body


def _segment(s: pb.Segment) -> dict[str, Any]:
    return {
        "id": s.id,
        "seek": s.seek,
        "start": s.start,
        "end": s.end,
        "text": s.text,
        "tokens": list(s.tokens),
        "temperature": s.temperature,
        "avg_logprob": s.avg_logprob,
        "compression_ratio": s.compression_ratio,
        "no_speech_prob": s.no_speech_prob,
    }


def words(segments: Sequence[pb.Segment]) -> list[dict[str, Any]]:
    """Every word of every segment, without the space and punctuation Whisper attaches to it."""
    out = []
    for segment in segments:
        for w in segment.words:
            text = _bare(w.word)
            if text:
                out.append({"word": text, "start": w.start, "end": w.end})
    return out


def _bare(word: str) -> str:
    """A word as OpenAI lists it: Whisper glues the leading space and surrounding punctuation to its words."""
    start, end = 0, len(word)
    while start < end and _is_trimmed(word[start]):
        start += 1
    while end > start and _is_trimmed(word[end - 1]):
        end -= 1
    return word[start:end]


def _is_trimmed(char: str) -> bool:
    return char.isspace() or unicodedata.category(char).startswith("P")


def to_text(response: pb.TranscribeResponse) -> str:
    return response.text + "\n"


def _cues(response: pb.TranscribeResponse) -> list[tuple[float, float, str]]:
    """(start, end, text) per non-empty segment, clamped to the audio so that no cue outlives it."""
    duration = response.duration_seconds
    cues = []
    for s in response.segments:
        text = s.text.strip()
        if not text:
            continue
        start = min(max(s.start, 0.0), duration)
        cues.append((start, min(max(s.end, start), duration), text))
    return cues


def _timestamp(seconds: float, separator: str) -> str:
    ms = round(seconds * 1000)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{ms:03d}"


def to_srt(response: pb.TranscribeResponse) -> str:
    blocks = [
        f"{i}\n{_timestamp(start, ',')} --> {_timestamp(end, ',')}\n{text}\n"
        for i, (start, end, text) in enumerate(_cues(response), start=1)
    ]
    return "\n".join(blocks)


def to_vtt(response: pb.TranscribeResponse) -> str:
    blocks = [f"{_timestamp(start, '.')} --> {_timestamp(end, '.')}\n{text}\n" for start, end, text in _cues(response)]
    return "\n".join(["WEBVTT\n", *blocks])


# -- streams -----------------------------------------------------------------------------------------------------


class TextDeltas:
    """Turns segment texts into deltas whose concatenation is exactly the final text (the outer whitespace of the
    joined transcript never reaches the client, so deltas and `transcript.text.done` always agree)."""

    def __init__(self) -> None:
        self._raw = ""
        self.text = ""

    def push(self, segment_text: str) -> str:
        self._raw += segment_text
        shown = self._raw.strip()
        delta, self.text = shown[len(self.text) :], shown
        return delta


def delta_event(delta: str) -> dict[str, Any]:
    return {"type": "transcript.text.delta", "delta": delta}


def done_event(text: str, usage: pb.TranscriptionUsage) -> dict[str, Any]:
    input_tokens = usage.input_text_tokens + usage.input_audio_tokens
    return {
        "type": "transcript.text.done",
        "text": text,
        "usage": {
            "type": "tokens",
            "input_tokens": input_tokens,
            "input_token_details": {"text_tokens": usage.input_text_tokens, "audio_tokens": usage.input_audio_tokens},
            "output_tokens": usage.output_tokens,
            "total_tokens": input_tokens + usage.output_tokens,
        },
    }
