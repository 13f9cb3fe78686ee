"""Decoding uploads from memory: every accepted format, and every way an upload can be bad, refused early."""

from __future__ import annotations

import numpy as np
import pytest

from services.common.errors import InvalidRequestError
from services.transcription import audio
from services.transcription.audio import decode, sniff_format
from tests.support.audio import FORMATS, encode, encode_as, silence_flac, tone

TONE = tone(3.0)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_openai_format_decodes_to_16k_mono_float(name):
    decoded = decode(encode_as(TONE, name), max_seconds=60)
    assert decoded.samples.dtype == np.float32 and decoded.samples.ndim == 1
    assert decoded.duration_seconds == pytest.approx(3.0, abs=0.1)
    # The tone survives the trip: same loudness, not silence or noise.
    assert np.sqrt(np.mean(decoded.samples**2)) == pytest.approx(0.3 / np.sqrt(2), rel=0.2)


def test_float_stereo_at_48k_is_downmixed_and_resampled():
    decoded = decode(encode(TONE, "wav", "pcm_f32le", 48000, "stereo"), max_seconds=60)
    assert len(decoded.samples) == pytest.approx(3 * 16000, abs=160)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"this is a text file, not audio\n" * 10, "Invalid file format"),
        (b"\x89PNG\r\n\x1a\n" + bytes(200), "Invalid file format"),
        (b"\xff\xf1\x50\x80" + bytes(200), "Invalid file format"),  # AAC ADTS: not on OpenAI's list
        (b"fLaC" + bytes(200), "corrupted"),
        (b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(100), "corrupted"),
    ],
)
def test_non_audio_and_garbage_are_invalid_requests_naming_file(data, message):
    with pytest.raises(InvalidRequestError, match=message) as info:
        decode(data, max_seconds=60)
    assert info.value.param == "file" and info.value.http_status == 400


@pytest.mark.parametrize("name", ["flac", "wav", "m4a", "webm"])
def test_truncated_files_are_refused_not_half_transcribed(name):
    data = encode_as(tone(6.0), name)
    with pytest.raises(InvalidRequestError, match=r"truncated|corrupted") as info:
        decode(data[: len(data) // 2], max_seconds=60)
    assert info.value.param == "file"


def test_header_only_file_is_refused():
    data = encode_as(TONE, "flac")
    with pytest.raises(InvalidRequestError, match=r"truncated|corrupted"):
        decode(data[:120], max_seconds=60)


def test_decompression_bomb_is_refused_from_its_header_before_decoding(monkeypatch):
    bomb = silence_flac(1900)  # 31 minutes of silence in a few hundred kilobytes
    assert len(bomb) < 1_000_000

    def must_not_decode(*_, **__):
        raise AssertionError("decoded a file whose header already exceeds the limit")

    monkeypatch.setattr(audio, "_decode_stream", must_not_decode)
    with pytest.raises(InvalidRequestError, match="too long") as info:
        decode(bomb, max_seconds=1800)
    assert info.value.code == "audio_too_long" and info.value.param == "file"


def test_a_file_without_a_declared_duration_stops_decoding_at_the_limit(monkeypatch):
    monkeypatch.setattr(audio, "_declared_seconds", lambda *_: None)  # a header that says nothing (or lies)
    decoded_chunks = []
    real = audio._Resampler.push

    def counting(self, frame):
        out = real(self, frame)
        decoded_chunks.extend(out)
        return out

    monkeypatch.setattr(audio._Resampler, "push", counting)
    with pytest.raises(InvalidRequestError, match="too long"):
        decode(encode_as(tone(60.0), "flac"), max_seconds=5)
    assert sum(len(c) for c in decoded_chunks) < 7 * 16000  # stopped just past 5 s, not after 60


def lie_about_length(flac: bytes, seconds: float) -> bytes:
    """`flac` with its STREAMINFO claiming `seconds` (0: "unknown"), as a crafted upload would."""
    data = bytearray(flac)
    rate = int.from_bytes(data[18:21], "big") >> 4
    field = int.from_bytes(data[18:26], "big")
    field = (field & ~((1 << 36) - 1)) | int(seconds * rate)
    data[18:26] = field.to_bytes(8, "big")
    return bytes(data)


@pytest.mark.parametrize("claimed", [0, 10])
def test_a_header_that_lies_is_caught_by_counting_packets_before_decoding(monkeypatch, claimed):
    bomb = lie_about_length(silence_flac(600), claimed)  # ten minutes, claiming none or ten seconds

    def must_not_decode(*_, **__):
        raise AssertionError("decoded a file whose packets already exceed the limit")

    monkeypatch.setattr(audio, "_decode_stream", must_not_decode)
    with pytest.raises(InvalidRequestError, match="too long") as info:
        decode(bomb, max_seconds=60)
    assert info.value.code == "audio_too_long"


def test_decoding_itself_stops_at_the_limit_whatever_the_packets_say(monkeypatch):
    monkeypatch.setattr(audio, "_count_packets", lambda *_, **__: None)  # packets without durations
    monkeypatch.setattr(audio, "_declared_seconds", lambda *_: None)
    decoded = []
    real = audio._Resampler.push
    monkeypatch.setattr(audio._Resampler, "push", lambda self, frame: decoded.extend(out := real(self, frame)) or out)
    with pytest.raises(InvalidRequestError, match="too long"):
        decode(encode_as(tone(60.0), "flac"), max_seconds=5)
    assert sum(len(c) for c in decoded) < 7 * 16000


def test_limit_is_inclusive_of_exactly_max_seconds():
    assert decode(encode_as(TONE, "wav"), max_seconds=3.0).duration_seconds == pytest.approx(3.0)


@pytest.mark.parametrize(
    ("head", "fmt"),
    [
        (b"fLaC", "flac"),
        (b"ID3\x04\x00\x00\x00\x00\x00\x00\xff\xfb", "mp3"),
        (b"\xff\xfb\x90\x00", "mp3"),
        (b"RIFF\x00\x00\x00\x00WAVE", "wav"),
        (b"OggS", "ogg"),
        (b"\x00\x00\x00\x20ftypM4A ", "mov"),
        (b"\x1a\x45\xdf\xa3", "matroska"),
        (b"\x00\x00\x01\xba", "mpeg"),
        (b"#EXTM3U\n#EXT-X-VERSION:3\nfile:///etc/passwd", None),  # playlists never reach FFmpeg
        (b"ffconcat version 1.0\nfile /etc/passwd", None),
    ],
)
def test_format_is_recognised_by_content_only(head, fmt):
    assert sniff_format(head + bytes(16)) == fmt


def test_id3_tagged_flac_is_flac():
    tag = b"ID3\x04\x00\x00\x00\x00\x00\x0a" + bytes(10)
    assert sniff_format(tag + b"fLaC" + bytes(16)) == "flac"
