"""Test audio: the shared jfk.flac (never copied into the repository), re-encoded in memory to every format OpenAI
accepts, plus synthetic audio and the word error rate the tests judge transcripts by."""

from __future__ import annotations

import functools
import io
import re
from pathlib import Path

import av
import numpy as np
import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[2]
JFK_PATH = PROJECT_ROOT.parent / "shared" / "data" / "jfk.flac"
# The reference transcript from ../shared/data/README.md.
JFK_REFERENCE = (
    "And so, my fellow Americans, ask not what your country can do for you, ask what you can do for your country."
)
JFK_SECONDS = 11.0

require_jfk = pytest.mark.skipif(
    not JFK_PATH.is_file(), reason="../shared/data/jfk.flac is absent (it lives beside the checkout, not in it)"
)

# (container, codec, sample rate, layout) per upload format OpenAI lists; mpga/mpeg audio is MP3's own container.
FORMATS: dict[str, tuple[str, str, int, str]] = {
    "wav": ("wav", "pcm_s16le", 16000, "mono"),
    "mp3": ("mp3", "libmp3lame", 44100, "stereo"),
    "ogg": ("ogg", "libopus", 48000, "mono"),
    "webm": ("webm", "libopus", 48000, "stereo"),
    "m4a": ("ipod", "aac", 44100, "mono"),
    "mp4": ("mp4", "aac", 22050, "stereo"),
    "mpeg": ("mpeg", "mp2", 44100, "stereo"),
    "flac": ("flac", "flac", 16000, "mono"),
}


@functools.cache
def jfk_bytes() -> bytes:
    return JFK_PATH.read_bytes()


@functools.cache
def jfk_samples() -> np.ndarray:
    """jfk.flac as 16 kHz mono float32."""
    with av.open(str(JFK_PATH)) as container:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=16000)
        frames = [f for frame in container.decode(audio=0) for f in resampler.resample(frame)]
        frames += resampler.resample(None)
    return np.concatenate([f.to_ndarray().reshape(-1) for f in frames])


def tone(seconds: float, frequency: float = 440.0, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate), dtype=np.float32) / rate
    return (0.3 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def encode(samples: np.ndarray, container: str, codec: str, rate: int = 16000, layout: str = "mono") -> bytes:
    """Encode 16 kHz mono float32 samples in memory (PyAV converts rate, layout and sample format)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        context = stream.codec_context
        resampler = av.AudioResampler(
            format=context.codec.audio_formats[0].name, layout=layout, rate=rate, frame_size=context.frame_size or 1024
        )
        source = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="flt", layout="mono")
        source.sample_rate = 16000
        for frame in resampler.resample(source) + resampler.resample(None):
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buffer.getvalue()


def encode_as(samples: np.ndarray, name: str) -> bytes:
    return encode(samples, *FORMATS[name])


def silence_flac(seconds: float, rate: int = 8000) -> bytes:
    """Hours of silence compress to almost nothing: the "decompression bomb" the duration limit must catch early."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="flac") as out:
        stream = out.add_stream("flac", rate=rate, layout="mono")
        minute = np.zeros((1, rate * 60), dtype=np.int16)
        for _ in range(int(np.ceil(seconds / 60))):
            frame = av.AudioFrame.from_ndarray(minute, format="s16", layout="mono")
            frame.sample_rate = rate
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buffer.getvalue()


def words(text: str) -> list[str]:
    """Lower-case words without punctuation (what the word error rate compares)."""
    return re.sub(r"[^\w\s']", " ", text.lower()).replace("'", "").split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level Levenshtein distance over the reference length, case and punctuation ignored."""
    ref, hyp = words(reference), words(hypothesis)
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        current = [i]
        for j, h in enumerate(hyp, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h)))
        previous = current
    return previous[-1] / max(len(ref), 1)
