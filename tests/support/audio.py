"""Test audio: real speech with its reference transcript, re-encoded in memory to every format OpenAI accepts, plus
synthetic audio and the word error rate the tests judge transcripts by.

The speech is ../shared/data/jfk.flac where it is present beside the checkout (never copied into the repository):
11 s of a real recording. Where it is absent, it is a recording from a registry package pinned in pyproject's dev
extra: pytest-audioeval ships short spoken WAVs with their transcripts, and its English "quick brown fox" is the
clip used. Tests read what they need (bytes, samples, reference, duration, a word it contains) from :data:`SPEECH`,
so they run, and are judged by the same word error rate, in either checkout.
"""

from __future__ import annotations

import functools
import importlib.metadata
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[2]
JFK_PATH = PROJECT_ROOT.parent / "shared" / "data" / "jfk.flac"
# The reference transcript from ../shared/data/README.md.
JFK_REFERENCE = (
    "And so, my fellow Americans, ask not what your country can do for you, ask what you can do for your country."
)


@dataclass(frozen=True)
class Speech:
    """A recording of real English speech and what was said in it."""

    path: Path
    reference: str
    keyword: str  # a word of the reference that Whisper's prompt can be biased towards

    @property
    def name(self) -> str:
        """The file name an upload carries."""
        return self.path.name

    def data(self) -> bytes:
        """The file's bytes, as a client uploads them."""
        return _file_bytes(self.path)

    def samples(self) -> np.ndarray:
        """The speech as 16 kHz mono float32."""
        return _decoded(self.path)

    @property
    def seconds(self) -> float:
        return len(self.samples()) / 16000

    @property
    def billed_seconds(self) -> int:
        """What `usage.seconds` reports: the duration rounded up to a whole second, as OpenAI bills it."""
        return math.ceil(self.seconds)

    @property
    def word_count(self) -> int:
        return len(words(self.reference))


def _registry_speech() -> Speech:
    """pytest-audioeval's English pangram, located through the installed distribution's own file list."""
    wav = importlib.metadata.distribution("pytest-audioeval").locate_file(
        "pytest_audioeval/samples/audio/en/quick_brown_fox.wav"
    )
    path = Path(str(wav))
    return Speech(path, path.with_suffix(".txt").read_text(encoding="utf-8").strip(), keyword="fox")


JFK = Speech(JFK_PATH, JFK_REFERENCE, keyword="Americans")
SPEECH = JFK if JFK_PATH.is_file() else _registry_speech()


@functools.cache
def _file_bytes(path: Path) -> bytes:
    return path.read_bytes()


@functools.cache
def _decoded(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=16000)
        frames = [f for frame in container.decode(audio=0) for f in resampler.resample(frame)]
        frames += resampler.resample(None)
    return np.concatenate([f.to_ndarray().reshape(-1) for f in frames])


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
