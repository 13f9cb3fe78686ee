"""The five response formats and the stream events, rendered from protos; shapes checked against OpenAI's schemas."""

from __future__ import annotations

import pytest

from ark.transcription.v1 import transcription_service_pb2 as pb
from edge.transcriptions import translate
from edge.transcriptions.schemas import TranscriptionRequest, VadConfig
from tests.support.openapi import validate


def response() -> pb.TranscribeResponse:
    return pb.TranscribeResponse(
        text="And so, my fellow Americans ask not. Ask what you can do.",
        language="en",
        duration_seconds=10.4,
        segments=[
            pb.Segment(
                id=0,
                start=0.0,
                end=8.0,
                text=" And so, my fellow Americans ask not.",
                tokens=[50363, 843, 523],
                avg_logprob=-0.3,
                compression_ratio=1.3,
                no_speech_prob=0.07,
                words=[
                    pb.Word(word=" And", start=0.0, end=0.7),
                    pb.Word(word=" so,", start=0.7, end=1.1),
                    pb.Word(word=" not.", start=7.5, end=8.0),
                ],
            ),
            pb.Segment(id=1, start=8.0, end=10.5, text=" Ask what you can do.", seek=0),
            pb.Segment(id=2, start=10.5, end=10.5, text=" "),
        ],
        usage=pb.TranscriptionUsage(input_text_tokens=4, input_audio_tokens=520, output_tokens=20),
    )


def test_json_has_text_and_duration_usage_rounded_up():
    body = translate.to_json(response())
    validate("CreateTranscriptionResponseJson", body)
    assert body == {"text": response().text, "usage": {"type": "duration", "seconds": 11}}


def test_verbose_json_validates_and_follows_the_granularities():
    body = translate.to_verbose_json(response(), {"segment", "word"})
    validate("CreateTranscriptionResponseVerboseJson", body)
    assert body["language"] == "english" and body["duration"] == 10.4 and body["task"] == "transcribe"
    assert [s["id"] for s in body["segments"]] == [0, 1, 2]
    assert [w["word"] for w in body["words"]] == ["And", "so", "not"]  # no leading space, no punctuation
    assert "words" not in translate.to_verbose_json(response(), {"segment"})
    assert "segments" not in translate.to_verbose_json(response(), {"word"})


def test_text_is_the_transcript_and_a_newline():
    assert translate.to_text(response()) == response().text + "\n"


def test_srt_numbers_cues_and_clamps_them_to_the_audio():
    assert translate.to_srt(response()) == (
        "1\n00:00:00,000 --> 00:00:08,000\nAnd so, my fellow Americans ask not.\n\n"
        "2\n00:00:08,000 --> 00:00:10,400\nAsk what you can do.\n"
    )


def test_vtt_has_its_header_and_dotted_milliseconds():
    assert translate.to_vtt(response()) == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:08.000\nAnd so, my fellow Americans ask not.\n\n"
        "00:00:08.000 --> 00:00:10.400\nAsk what you can do.\n"
    )


def test_timestamps_past_an_hour():
    r = pb.TranscribeResponse(duration_seconds=4000, segments=[pb.Segment(start=3723.5, end=3725.0456, text="x")])
    assert "01:02:03,500 --> 01:02:05,046" in translate.to_srt(r)


@pytest.mark.parametrize(
    "segments", [[" And so,", " my fellow", " Americans."], ["  ", " Hello", "", " world ", " again. "]]
)
def test_stream_deltas_concatenate_to_exactly_the_final_text(segments):
    deltas = translate.TextDeltas()
    sent = "".join(deltas.push(s) for s in segments)
    assert sent == deltas.text == "".join(segments).strip()


def test_stream_events_validate():
    validate("CreateTranscriptionResponseStreamEvent", translate.delta_event(" so"))
    done = translate.done_event("And so.", response().usage)
    validate("TranscriptTextDoneEvent", done)
    assert done["usage"] == {
        "type": "tokens",
        "input_tokens": 524,
        "input_token_details": {"text_tokens": 4, "audio_tokens": 520},
        "output_tokens": 20,
        "total_tokens": 544,
    }


def test_options_carry_everything_the_engine_needs():
    body = TranscriptionRequest(
        file=b"x",
        model="whisper-1",
        language="en",
        prompt="JFK",
        temperature=0.2,
        keywords=["Americans"],
        chunking_strategy=VadConfig(type="server_vad"),
    )
    options = translate.options_to_proto(body, model_id="whisper-tiny.en", granularities={"word", "segment"})
    assert options.model == "whisper-tiny.en" and options.language == "en" and options.prompt == "JFK"
    assert options.temperature == pytest.approx(0.2) and list(options.keywords) == ["Americans"]
    assert pb.TIMESTAMP_GRANULARITY_WORD in options.timestamp_granularities
    vad = options.voice_activity_detection
    assert (vad.threshold, vad.prefix_padding_ms, vad.silence_duration_ms) == (0.5, 300, 200)  # OpenAI's defaults


def test_unset_options_stay_unset():
    options = translate.options_to_proto(TranscriptionRequest(file=b"x", model="m"), model_id="m", granularities=[])
    assert not options.HasField("temperature") and not options.HasField("voice_activity_detection")
    auto = TranscriptionRequest(file=b"x", model="m", chunking_strategy="auto")
    auto_options = pb.TranscriptionOptions.FromString(
        translate.options_to_proto(auto, model_id="m", granularities=[]).SerializeToString()
    )
    assert auto_options.HasField("voice_activity_detection")  # present on the wire, with the engine's defaults
    assert not auto_options.voice_activity_detection.HasField("threshold")
