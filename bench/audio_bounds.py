"""What the transcription service's bounds save, side by side in one run: each measure against what it replaces.

1. A FLAC of silence longer than `limits.max_audio_seconds` whose header claims 10 s: refused by counting its
   packets (what ARK does) versus by decoding it up to the limit (what it did, and what still bounds a file whose
   packets carry no durations). Time and the peak of memory allocated (tracemalloc sees numpy's buffers).
2. A legal file that is only silence, transcribed by faster-whisper with voice activity detection (ARK's default)
   and without: time, and the text, which without it is words Whisper invents.

    .venv/bin/python -m bench.audio_bounds [--bomb-minutes 40] [--silence-minutes 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc
from collections.abc import Callable
from typing import Any
from unittest import mock

import numpy as np
from faster_whisper import WhisperModel

from services.common.config import Capability, load_config, resolve_model_path
from services.common.errors import InvalidRequestError
from services.transcription import audio
from services.transcription.domain import DecodeOptions
from services.transcription.engines.faster_whisper import FasterWhisperSettings, model_kwargs, transcribe_kwargs
from tests.support.audio import silence_flac


def lie_about_length(flac: bytes, seconds: float) -> bytes:
    data = bytearray(flac)
    rate = int.from_bytes(data[18:21], "big") >> 4
    field = int.from_bytes(data[18:26], "big")
    data[18:26] = ((field & ~((1 << 36) - 1)) | int(seconds * rate)).to_bytes(8, "big")
    return bytes(data)


def _refuse(refuse: Callable[[], Any]) -> None:
    try:
        refuse()
    except InvalidRequestError as exc:
        assert exc.code == "audio_too_long", exc
    else:
        raise AssertionError("the bomb was accepted")


def measure(refuse: Callable[[], Any]) -> tuple[float, float]:
    """Seconds `refuse()` takes to raise audio_too_long, and the peak MB it allocates (a second run: tracing
    allocations slows Python code down, so time and memory are not taken in the same run)."""
    started = time.perf_counter()
    _refuse(refuse)
    elapsed = time.perf_counter() - started
    tracemalloc.start()
    _refuse(refuse)
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return elapsed, peak


def bomb(minutes: float, rounds: int, max_seconds: float) -> None:
    data = lie_about_length(silence_flac(minutes * 60), 10)
    counted, decoded = [], []
    for _ in range(rounds):
        counted.append(measure(lambda: audio.decode(data, max_seconds=max_seconds)))
        with mock.patch.object(audio, "_count_packets", lambda *_, **__: None):
            decoded.append(measure(lambda: audio.decode(data, max_seconds=max_seconds)))
    c_time, c_mem = (statistics.median(x) for x in zip(*counted, strict=True))
    d_time, d_mem = (statistics.median(x) for x in zip(*decoded, strict=True))
    print(f"bomb: {minutes:g} min of silent FLAC ({len(data) / 1e6:.1f} MB) claiming 10 s, limit {max_seconds:g} s")
    print(f"  packets counted (ARK):    {c_time * 1000:8.1f} ms  {c_mem:7.1f} MB peak")
    print(f"  decoded up to the limit:  {d_time * 1000:8.1f} ms  {d_mem:7.1f} MB peak")
    print(f"  ratio ARK / decoding:     {c_time / d_time:8.3f}x time  {c_mem / max(d_mem, 1e-9):.3f}x memory")


def silence(minutes: float) -> None:
    model_config = next(m for m in load_config().models_for(Capability.TRANSCRIPTION) if m.engine == "faster_whisper")
    settings = FasterWhisperSettings.of(model_config)
    model = WhisperModel(str(resolve_model_path(model_config.path)), local_files_only=True, **model_kwargs(settings))
    samples = np.zeros(int(minutes * 60 * 16000), dtype=np.float32)
    print(f"silence: {minutes:g} min, {model_config.id}")
    times = {}
    for vad in (True, False):
        kwargs = transcribe_kwargs(settings.model_copy(update={"vad_filter": vad}), DecodeOptions(language="en"))
        started = time.perf_counter()
        segments, _ = model.transcribe(samples, **kwargs)
        text = " ".join(s.text.strip() for s in segments)
        times[vad] = time.perf_counter() - started
        label = "with VAD (ARK)" if vad else "without VAD"
        print(f"  {label:16s} {times[vad]:7.1f} s  text: {text[:60]!r}{'…' if len(text) > 60 else ''}")
    print(f"  ratio with / without:    {times[True] / times[False]:.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bomb-minutes", type=float, default=40)
    parser.add_argument("--silence-minutes", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    bomb(args.bomb_minutes, args.rounds, load_config().limits.max_audio_seconds)
    silence(args.silence_minutes)


if __name__ == "__main__":
    main()
