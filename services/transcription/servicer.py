"""gRPC glue for TranscriptionService: protos in, domain calls, protos out. No logic of its own."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from ark.transcription.v1 import transcription_service_pb2 as pb
from ark.transcription.v1 import transcription_service_pb2_grpc as pb_grpc
from services.common.errors import ModelNotFoundError
from services.common.server import Service
from services.transcription.domain import (
    Finished,
    Segment,
    Started,
    TranscriptionEvent,
    TranscriptionRequest,
    Usage,
    VoiceActivity,
)
from services.transcription.transcriber import Transcriber

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TranscriptionService"].full_name


def request_from_proto(request_id: str, audio: bytes, options: pb.TranscriptionOptions) -> TranscriptionRequest:
    vad = None
    if options.HasField("voice_activity_detection"):
        v = options.voice_activity_detection
        vad = VoiceActivity(
            threshold=v.threshold if v.HasField("threshold") else None,
            prefix_padding_ms=v.prefix_padding_ms if v.HasField("prefix_padding_ms") else None,
            silence_duration_ms=v.silence_duration_ms if v.HasField("silence_duration_ms") else None,
        )
    return TranscriptionRequest(
        request_id=request_id,
        model=options.model,
        audio=audio,
        language=options.language,
        languages=tuple(options.languages),
        prompt=options.prompt,
        keywords=tuple(options.keywords),
        temperature=options.temperature if options.HasField("temperature") else None,
        word_timestamps=pb.TIMESTAMP_GRANULARITY_WORD in options.timestamp_granularities,
        voice_activity=vad,
    )


class TranscriptionServicer(pb_grpc.TranscriptionServiceServicer):
    def __init__(self, transcribers: dict[str, Transcriber]) -> None:
        self._transcribers = transcribers

    def _events(self, request: pb.TranscribeRequest | pb.StreamTranscribeRequest) -> AsyncIterator[TranscriptionEvent]:
        transcriber = self._transcribers.get(request.options.model)
        if transcriber is None:
            raise ModelNotFoundError(request.options.model)
        return transcriber.transcribe(request_from_proto(request.request_id, request.audio, request.options))

    async def Transcribe(
        self, request: pb.TranscribeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TranscribeResponse:
        response = pb.TranscribeResponse()
        events = self._events(request)
        try:
            async for event in events:
                if isinstance(event, Started):
                    response.language = event.language
                elif isinstance(event, Segment):
                    response.segments.append(segment_to_proto(event))
                elif isinstance(event, Finished):
                    response.text = event.text
                    response.duration_seconds = event.duration_seconds
                    response.usage.CopyFrom(usage_to_proto(event.usage))
        finally:
            await events.aclose()
        return response

    async def StreamTranscribe(
        self, request: pb.StreamTranscribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamTranscribeResponse]:
        events = self._events(request)
        try:
            async for event in events:
                yield event_to_proto(event)
        finally:
            # A client disconnect arrives here as CancelledError: closing the generator stops transcription.
            await events.aclose()


def segment_to_proto(s: Segment) -> pb.Segment:
    return pb.Segment(
        id=s.id,
        seek=s.seek,
        start=s.start,
        end=s.end,
        text=s.text,
        tokens=s.tokens,
        temperature=s.temperature,
        avg_logprob=s.avg_logprob,
        compression_ratio=s.compression_ratio,
        no_speech_prob=s.no_speech_prob,
        words=[pb.Word(word=w.word, start=w.start, end=w.end) for w in s.words],
    )


def usage_to_proto(u: Usage) -> pb.TranscriptionUsage:
    return pb.TranscriptionUsage(
        input_text_tokens=u.input_text_tokens, input_audio_tokens=u.input_audio_tokens, output_tokens=u.output_tokens
    )


def event_to_proto(event: TranscriptionEvent) -> pb.StreamTranscribeResponse:
    if isinstance(event, Segment):
        return pb.StreamTranscribeResponse(segment=segment_to_proto(event))
    if isinstance(event, Started):
        return pb.StreamTranscribeResponse(
            started=pb.TranscriptionStarted(language=event.language, duration_seconds=event.duration_seconds)
        )
    return pb.StreamTranscribeResponse(
        finished=pb.TranscriptionFinished(
            text=event.text, duration_seconds=event.duration_seconds, usage=usage_to_proto(event.usage)
        )
    )


def transcription_service(transcribers: dict[str, Transcriber]) -> Service:
    return Service(
        SERVICE_NAME, TranscriptionServicer(transcribers), pb_grpc.add_TranscriptionServiceServicer_to_server
    )
