"""/v1/audio/transcriptions through the whole stack on Whisper tiny.en, driven by the official openai client."""

from __future__ import annotations

import itertools
import json
import os
import re
import tempfile
import uuid
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.audio import FORMATS, SPEECH, encode, encode_as, silence_flac, word_error_rate
from tests.support.openapi import validate

pytestmark = pytest.mark.e2e

MAX_AUDIO_BYTES = 25 * 1024 * 1024  # the default limits.max_audio_bytes


def speech_file() -> tuple[str, bytes]:
    """The recorded speech as a client uploads it: its file name and bytes."""
    return (SPEECH.name, SPEECH.data())


def raw_json(raw) -> dict:
    return json.loads(raw.text)


# -- the five formats ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe", "whisper-tiny.en"])
def test_json_with_every_model_name(client, model):
    raw = client.audio.transcriptions.with_raw_response.create(file=speech_file(), model=model)
    assert raw.headers["x-request-id"]
    body = raw_json(raw)
    validate("CreateTranscriptionResponseJson", body)
    assert word_error_rate(SPEECH.reference, raw.parse().text) <= 0.1, body
    assert body["usage"] == {"type": "duration", "seconds": SPEECH.billed_seconds}


def test_text(client):
    text = client.audio.transcriptions.create(file=speech_file(), model="whisper-1", response_format="text")
    assert isinstance(text, str) and word_error_rate(SPEECH.reference, text) <= 0.1


def parse_cues(document: str, separator: str) -> list[tuple[float, float, str]]:
    """(start, end, text) of each cue of an SRT or WebVTT document; fails on anything malformed."""
    stamp = rf"(\d\d):(\d\d):(\d\d){re.escape(separator)}(\d\d\d)"
    timing = re.compile(rf"^{stamp} --> {stamp}$")
    cues = []
    for block in document.strip().split("\n\n"):
        lines = block.split("\n")
        if lines[0] == "WEBVTT":
            continue
        if separator == ",":
            assert lines[0].isdigit() and int(lines[0]) == len(cues) + 1, block
            lines = lines[1:]
        match = timing.match(lines[0])
        assert match, f"bad timing line: {lines[0]!r}"
        h1, m1, s1, ms1, h2, m2, s2, ms2 = map(int, match.groups())
        start, end = h1 * 3600 + m1 * 60 + s1 + ms1 / 1000, h2 * 3600 + m2 * 60 + s2 + ms2 / 1000
        assert len(lines) > 1 and lines[1].strip(), block
        cues.append((start, end, " ".join(lines[1:])))
    return cues


@pytest.mark.parametrize(("response_format", "separator"), [("srt", ","), ("vtt", ".")])
def test_subtitles_parse_and_their_cues_increase_within_the_audio(client, response_format, separator):
    document = client.audio.transcriptions.create(
        file=speech_file(), model="whisper-1", response_format=response_format
    )
    if response_format == "vtt":
        assert document.startswith("WEBVTT\n\n")
    cues = parse_cues(document, separator)
    assert cues
    for start, end, _ in cues:
        assert 0 <= start <= end <= SPEECH.seconds
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in itertools.pairwise(cues))
    assert word_error_rate(SPEECH.reference, " ".join(text for *_, text in cues)) <= 0.1


def test_verbose_json_with_segments_and_words(client):
    raw = client.audio.transcriptions.with_raw_response.create(
        file=speech_file(),
        model="whisper-1",
        response_format="verbose_json",
        timestamp_granularities=["segment", "word"],
    )
    body = raw_json(raw)
    validate("CreateTranscriptionResponseVerboseJson", body)
    parsed = raw.parse()
    assert parsed.language == "english" and parsed.duration == pytest.approx(SPEECH.seconds)
    assert word_error_rate(SPEECH.reference, parsed.text) <= 0.1
    assert parsed.usage.type == "duration" and parsed.usage.seconds == SPEECH.billed_seconds
    segments, words = parsed.segments, parsed.words
    assert segments and [s.id for s in segments] == list(range(len(segments)))
    assert word_error_rate(SPEECH.reference, " ".join(w.word for w in words)) <= 0.1
    assert all(0 <= w.start <= w.end <= SPEECH.seconds for w in words)
    assert all(a.start <= b.start and a.end <= b.end for a, b in itertools.pairwise(words))


def test_verbose_json_defaults_to_segments_only(client):
    body = raw_json(
        client.audio.transcriptions.with_raw_response.create(
            file=speech_file(), model="whisper-1", response_format="verbose_json"
        )
    )
    validate("CreateTranscriptionResponseVerboseJson", body)
    assert body["segments"] and "words" not in body


def test_prompt_temperature_language_keywords_and_vad_are_accepted(client):
    """Accepted and still transcribed right; their effect on the text is not asserted here (tiny.en on a clean
    recording gives the same words with or without them)."""
    result = client.audio.transcriptions.create(
        file=speech_file(),
        model="gpt-4o-transcribe",
        language="en",
        prompt=f"A recording that says {SPEECH.keyword}.",
        temperature=0.0,
        chunking_strategy={"type": "server_vad", "silence_duration_ms": 500},
        extra_body={"keywords": [SPEECH.keyword]},
    )
    assert word_error_rate(SPEECH.reference, result.text) <= 0.1
    auto = client.audio.transcriptions.create(file=speech_file(), model="whisper-1", chunking_strategy="auto")
    assert word_error_rate(SPEECH.reference, auto.text) <= 0.1


# -- streaming -----------------------------------------------------------------------------------------------------


def test_stream_through_the_official_client(client):
    events = list(client.audio.transcriptions.create(file=speech_file(), model="gpt-4o-transcribe", stream=True))
    assert [e.type for e in events[:-1]] == ["transcript.text.delta"] * (len(events) - 1) and len(events) >= 2
    done = events[-1]
    assert done.type == "transcript.text.done"
    assert "".join(e.delta for e in events[:-1]) == done.text
    assert word_error_rate(SPEECH.reference, done.text) <= 0.1
    assert done.usage.type == "tokens" and done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens


def test_stream_events_validate_against_openai_schemas(stack):
    with httpx.stream(
        "POST",
        f"{stack.base_url}/audio/transcriptions",
        headers={"authorization": f"Bearer {stack.api_key}"},
        files={"file": speech_file()},
        data={"model": "whisper-1", "stream": "true", "response_format": "text"},
        timeout=120,
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        payloads = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    for payload in payloads:
        validate("CreateTranscriptionResponseStreamEvent", payload)
    validate("TranscriptTextDoneEvent", payloads[-1])
    assert "".join(p["delta"] for p in payloads[:-1]) == payloads[-1]["text"]


def test_stream_errors_before_the_first_segment_are_http_errors(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.transcriptions.create(file=("x.mp3", b"not audio"), model="whisper-1", stream=True)
    assert info.value.body["param"] == "file"


# -- every upload format -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_upload_format(client, name):
    data = encode_as(SPEECH.samples(), name)
    result = client.audio.transcriptions.create(file=(f"speech.{name}", data), model="whisper-1")
    assert word_error_rate(SPEECH.reference, result.text) <= 0.1, (name, result.text)


# -- bad input -----------------------------------------------------------------------------------------------------


def ark_pids(stack) -> dict[str, int]:
    """PIDs of the edge and the transcription service, children of the launcher."""
    children = Path(f"/proc/{stack.process.pid}/task/{stack.process.pid}/children").read_text().split()
    found = {}
    for pid in map(int, children):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if "services.transcription" in cmdline:
            found["transcription"] = pid
        elif " edge" in cmdline:
            found["edge"] = pid
    assert set(found) == {"edge", "transcription"}, found
    return found


def open_temp_files(pids: dict[str, int]) -> list[str]:
    """Files under the temporary directory that the ARK processes hold open (deleted ones included)."""
    tmp = os.path.realpath(tempfile.gettempdir())
    held = []
    for pid in pids.values():
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith(tmp + "/"):
                held.append(target)
    return held


BAD_INPUTS = [
    # (what, file, extra arguments, status, param, code)
    ("non-audio bytes", ("notes.mp3", b"Just some text, definitely not audio.\n" * 50), {}, 400, "file", None),
    ("a PNG", ("image.wav", b"\x89PNG\r\n\x1a\n" + bytes(4096)), {}, 400, "file", None),
    ("an empty file", ("empty.flac", b""), {}, 400, "file", None),
    ("a truncated FLAC", ("cut.flac", None), {}, 400, "file", None),
    ("31 minutes of silence", ("bomb.flac", "bomb"), {}, 400, "file", "audio_too_long"),
    ("an unknown format", None, {"response_format": "xml"}, 400, "response_format", "invalid_value"),
    ("French", None, {"language": "fr"}, 400, "language", "unsupported_language"),
    ("a bad language code", None, {"language": "english"}, 400, "language", "invalid_language_format"),
    ("diarization", None, {"response_format": "diarized_json"}, 400, "response_format", "unsupported_value"),
    ("logprobs", None, {"include": ["logprobs"]}, 400, "include", "unsupported_parameter"),
    ("known speakers", None, {"known_speaker_names": ["agent"]}, 400, "known_speaker_names", "unsupported_parameter"),
    ("words without verbose_json", None, {"timestamp_granularities": ["word"]}, 400, "timestamp_granularities", None),
    ("a streamed srt", None, {"stream": True, "response_format": "srt"}, 400, "response_format", None),
    ("an unknown field", None, {"extra_body": {"colour": "blue"}}, 400, "colour", None),
    ("a temperature above 1", None, {"temperature": 1.5}, 400, "temperature", "invalid_value"),
    ("an unknown model", None, {"model": "whisper-large-v9"}, 404, "model", "model_not_found"),
    ("a chat model", None, {"model": "gpt-4o"}, 400, "model", "model_not_supported"),
]


def test_bad_input_is_an_openai_error_and_leaves_nothing_behind(client, stack):
    pids = ark_pids(stack)
    tmp = Path(tempfile.gettempdir())
    evil_name = f"ark-evil-{uuid.uuid4().hex}.flac"
    before_dir, before_fds = set(tmp.iterdir()), open_temp_files(pids)
    speech, flac = SPEECH.data(), encode(SPEECH.samples(), "flac", "flac")
    for what, file, extra, status, param, code in BAD_INPUTS:
        name, data = file or (f"../../../../../../{tmp}/{evil_name}", speech)
        data = flac[: len(flac) // 2] if data is None else silence_flac(1900) if data == "bomb" else data
        arguments = {"file": (name, data), "model": "whisper-1", **extra}
        with pytest.raises(openai.APIStatusError) as info:
            client.audio.transcriptions.create(**arguments)
        response = info.value.response
        assert response.status_code == status, (what, response.text)
        body = response.json()
        validate("ErrorResponse", body)
        assert body["error"]["param"] == param, (what, body)
        if code:
            assert body["error"]["code"] == code, (what, body)
        assert response.headers["x-request-id"]
    # Nothing left behind: no new files in the temporary directory, no temporary file held open, no file named
    # after the upload anywhere it could have been written; and the service still answers, in the same process.
    assert not list(tmp.glob(f"**/{evil_name}")) and not (Path.cwd() / evil_name).exists()
    leftover = [p for p in set(tmp.iterdir()) - before_dir if p.exists() and p.is_file()]
    assert not leftover, leftover
    assert open_temp_files(pids) == before_fds
    assert (
        word_error_rate(
            SPEECH.reference, client.audio.transcriptions.create(file=speech_file(), model="whisper-1").text
        )
        <= 0.1
    )
    assert ark_pids(stack) == pids


def test_upload_over_the_size_limit_is_413(client):
    with pytest.raises(openai.APIStatusError) as info:
        client.audio.transcriptions.create(file=("big.wav", bytes(MAX_AUDIO_BYTES + 1024)), model="whisper-1")
    assert info.value.status_code == 413
    body = info.value.response.json()
    validate("ErrorResponse", body)
    assert body["error"]["param"] == "file" and body["error"]["code"] == "request_too_large"
