"""The request of POST /v1/audio/transcriptions, fields in OpenAI's order (CreateTranscriptionRequest).

Every OpenAI field is accepted here (how each is treated lives in edge.compat); anything else is refused. The body
arrives as multipart form fields, so values are strings that pydantic coerces ("0.2" → 0.2, "true" → True).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

ResponseFormat = Literal["json", "text", "srt", "verbose_json", "vtt", "diarized_json"]


class VadConfig(BaseModel):
    """`chunking_strategy` as an object: server-side voice activity detection, with OpenAI's defaults."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["server_vad"]
    prefix_padding_ms: Annotated[int, Field(ge=0)] = 300
    silence_duration_ms: Annotated[int, Field(ge=0)] = 200
    threshold: Annotated[float, Field(ge=0, le=1)] = 0.5


class TranscriptionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The uploaded file's bytes; its name and content type are never used (the format is sniffed from the bytes).
    file: bytes
    model: Annotated[str, Field(min_length=1)]
    language: str | None = None
    languages: Annotated[list[str], Field(min_length=1)] | None = None
    keywords: list[str] | None = None
    prompt: str | None = None
    response_format: ResponseFormat | None = None
    temperature: Annotated[float, Field(ge=0, le=1)] | None = None
    include: list[Literal["logprobs"]] | None = None
    timestamp_granularities: list[Literal["word", "segment"]] | None = None
    stream: bool | None = None
    chunking_strategy: Literal["auto"] | VadConfig | None = None
    known_speaker_names: Annotated[list[str], Field(max_length=4)] | None = None
    known_speaker_references: Annotated[list[str], Field(max_length=4)] | None = None
