"""Uploaded audio → 16 kHz mono float32, decoded from memory with PyAV (FFmpeg), never through a temporary file.

Hostile input is the normal case here, so the order of checks matters:
1. the container is recognised by its magic bytes against OpenAI's list of formats, and only that demuxer is
   opened: FFmpeg's own probing would also accept playlists (HLS, concat) that make it open other files or URLs;
2. the duration the container declares is checked against the limit before any sample is decoded, so a small
   file that claims hours of audio is refused at once;
3. the packets are then counted without decoding them (demuxing costs a small fraction of decoding), so a file
   whose header lies about its length, or says nothing, is refused as soon as its packets pass the limit;
4. decoding writes into one buffer sized for the limit, allocated lazily (pages are only committed as they are
   written), and stops as soon as the decoded audio passes the limit: memory follows the audio actually decoded,
   never more than the limit, and there is no second copy to join the pieces;
5. a file that decodes to less than its header promises is refused as truncated rather than half-transcribed.
"""

from __future__ import annotations

import io
import logging

import av
import numpy as np

from services.common.errors import InvalidRequestError
from services.transcription.domain import SAMPLE_RATE, DecodedAudio

log = logging.getLogger(__name__)

SUPPORTED_FORMATS = ["flac", "m4a", "mp3", "mp4", "mpeg", "mpga", "oga", "ogg", "wav", "webm"]

# Containers whose header states the exact duration, so that decoding less than it means the file was cut short.
# (MP3 and MPEG-PS durations are estimates from the bitrate; they are checked against the limit only.)
_EXACT_DURATION = {"flac", "wav", "mov", "matroska", "ogg"}
# Slack for encoder padding and rounding before a shortfall counts as truncation.
_TRUNCATION_TOLERANCE = 0.05
_TRUNCATION_SLACK_SECONDS = 0.1


def sniff_format(data: bytes) -> str | None:
    """The FFmpeg demuxer for `data`, by magic bytes; None when it is none of the formats OpenAI accepts."""
    if data.startswith(b"ID3") and len(data) >= 10:
        # An ID3v2 tag (synchsafe size) may precede MP3 or FLAC audio; look at what follows it.
        size = 10 + ((data[6] & 0x7F) << 21 | (data[7] & 0x7F) << 14 | (data[8] & 0x7F) << 7 | (data[9] & 0x7F))
        return "flac" if data[size : size + 4] == b"fLaC" else "mp3"
    if data.startswith(b"fLaC"):
        return "flac"
    if data[:4] in (b"RIFF", b"RF64") and data[8:12] == b"WAVE":
        return "wav"
    if data.startswith(b"OggS"):
        return "ogg"
    if data[4:8] == b"ftyp":
        return "mov"  # mp4, m4a
    if data.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"  # webm
    if data.startswith(b"\x00\x00\x01\xba"):
        return "mpeg"
    # MPEG audio frame sync; layer bits 00 would be AAC (ADTS), which OpenAI does not accept.
    if len(data) >= 2 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0 and (data[1] >> 1) & 0x03:
        return "mp3"
    return None


def decode(data: bytes, *, max_seconds: float) -> DecodedAudio:
    """Decode a whole file or raise InvalidRequestError (param `file`) saying what is wrong with it."""
    if not data:
        raise _invalid("The audio file is empty.")
    fmt = sniff_format(data)
    if fmt is None:
        raise _invalid(f"Invalid file format. Supported formats: {SUPPORTED_FORMATS}")
    try:
        with av.open(io.BytesIO(data), mode="r", format=fmt, metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise _invalid("The file contains no audio stream.")
            stream = container.streams.audio[0]
            declared = _wav_declared_seconds(data) if fmt == "wav" else _declared_seconds(container, stream)
            if declared is not None and declared > max_seconds:
                raise _too_long(declared, max_seconds)
            _count_packets(container, stream, max_seconds=max_seconds)
        with av.open(io.BytesIO(data), mode="r", format=fmt, metadata_errors="ignore") as container:
            stream = container.streams.audio[0]
            samples = _decode_stream(container, stream, max_samples=int(max_seconds * SAMPLE_RATE))
    except (av.FFmpegError, ValueError) as exc:
        log.info("undecodable %s upload: %s", fmt, exc)
        raise _corrupted() from None
    if samples.size == 0:
        raise _corrupted()
    decoded = samples.size / SAMPLE_RATE
    shortfall = declared is not None and decoded < declared * (1 - _TRUNCATION_TOLERANCE) - _TRUNCATION_SLACK_SECONDS
    if fmt in _EXACT_DURATION and shortfall:
        raise _invalid(
            f"The audio file is truncated: its header declares {declared:.1f} s of audio but only "
            f"{decoded:.1f} s could be decoded."
        )
    return DecodedAudio(samples, fmt)


def _declared_seconds(container: av.container.InputContainer, stream: av.audio.stream.AudioStream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _wav_declared_seconds(data: bytes) -> float | None:
    """What a WAV header promises. FFmpeg clamps a WAV's duration to the bytes present, hiding truncation."""
    byte_rate = 0
    offset = 12
    while offset + 8 <= len(data):
        chunk, size = data[offset : offset + 4], int.from_bytes(data[offset + 4 : offset + 8], "little")
        if chunk == b"fmt " and offset + 20 <= len(data):
            byte_rate = int.from_bytes(data[offset + 16 : offset + 20], "little")
        elif chunk == b"data":
            # 0 and 0xFFFFFFFF mean "unknown" (streamed WAV, RF64): then only the limit applies.
            return size / byte_rate if byte_rate and 0 < size < 0xFFFFFFFF else None
        offset += 8 + size + (size & 1)
    return None


def _count_packets(
    container: av.container.InputContainer, stream: av.audio.stream.AudioStream, *, max_seconds: float
) -> None:
    """Refuse a stream whose packets add up to more than `max_seconds`, without decoding any of them.

    Packets without a duration count for nothing here; the decoder's own count (`_decode_stream`) still bounds them.
    """
    if stream.time_base is None:
        return
    limit = max_seconds / float(stream.time_base)  # in the stream's time base
    total = 0
    for packet in container.demux(stream):
        total += packet.duration or 0
        if total > limit:
            raise _too_long(None, max_seconds)


class _Resampler:
    """To 16 kHz mono float32; starts afresh if the input format changes mid-stream (concatenated files)."""

    def __init__(self) -> None:
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)

    def push(self, frame: av.AudioFrame | None) -> list[np.ndarray]:
        if frame is not None:
            frame.pts = None  # timestamps are irrelevant here; gaps must not make the filter insert silence
        try:
            out = self._resampler.resample(frame)
        except ValueError:
            if frame is None:
                raise
            out = self._resampler.resample(None)
            self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            out += self._resampler.resample(frame)
        return [f.to_ndarray().reshape(-1) for f in out]


def _decode_stream(
    container: av.container.InputContainer, stream: av.audio.stream.AudioStream, *, max_samples: int
) -> np.ndarray:
    resampler = _Resampler()
    # The resampler may flush a few samples past the limit; the slack keeps them in bounds.
    buffer = np.empty(max_samples + SAMPLE_RATE, dtype=np.float32)
    total = 0

    def keep(chunks: list[np.ndarray], limit: int) -> None:
        nonlocal total
        for chunk in chunks:
            if total + chunk.size > limit:
                raise _too_long(None, max_samples / SAMPLE_RATE)
            buffer[total : total + chunk.size] = chunk
            total += chunk.size

    damaged = 0
    for packet in container.demux(stream):
        try:
            frames = packet.decode()
        except av.error.InvalidDataError:
            damaged += 1  # a damaged packet costs its few milliseconds, as in FFmpeg's own tools
            continue
        for frame in frames:
            keep(resampler.push(frame), max_samples)
    keep(resampler.push(None), buffer.size)
    if damaged:
        log.info("skipped %d damaged packets", damaged)
    return buffer[:total]


def _invalid(message: str) -> InvalidRequestError:
    return InvalidRequestError(message, param="file", code="invalid_value")


def _corrupted() -> InvalidRequestError:
    return _invalid("Audio file might be corrupted or unsupported: it could not be decoded.")


def _too_long(seconds: float | None, max_seconds: float) -> InvalidRequestError:
    length = f" ({seconds:.1f} s)" if seconds is not None else ""
    return InvalidRequestError(
        f"The audio is too long{length}: the maximum duration is {max_seconds:g} seconds.",
        param="file",
        code="audio_too_long",
    )
