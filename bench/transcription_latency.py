"""Transcription latency through ARK versus faster-whisper in-process, side by side in one run.

The same file (../shared/data/jfk.flac, 11 s of speech), the same model files and the same settings on both sides
(ARK's configured compute type, threads and beam size; the language ARK resolves for the model), alternating between
the two so that machine noise hits both alike. ARK is timed end to end as a user sees it: the official openai
client uploading the file over HTTP to the edge, which sends it over gRPC to the transcription service, which
decodes it and runs the model; the reference is `WhisperModel.transcribe(path)` in this process, consuming every
segment. Reports the medians and the ratio the transcription issue sets a goal for: ARK <= 1.15x in-process.

    .venv/bin/python -m bench.transcription_latency [--rounds 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import openai
from faster_whisper import WhisperModel

from services.common.config import Capability, load_config, resolve_model_path
from services.transcription.domain import DecodeOptions
from services.transcription.engines.faster_whisper import FasterWhisperSettings, model_kwargs, transcribe_kwargs
from tests.support.audio import JFK_PATH, JFK_REFERENCE, word_error_rate
from tests.support.stack import start_stack

GOAL = 1.15


def run_in_process(model: WhisperModel, kwargs: dict) -> tuple[float, str]:
    start = time.perf_counter()
    segments, _ = model.transcribe(str(JFK_PATH), **kwargs)
    text = "".join(s.text for s in segments).strip()
    return time.perf_counter() - start, text


def run_through_ark(client: openai.OpenAI, data: bytes) -> tuple[float, str]:
    start = time.perf_counter()
    text = client.audio.transcriptions.create(file=("jfk.flac", data), model="whisper-1").text
    return time.perf_counter() - start, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    if not JFK_PATH.is_file():
        raise SystemExit(f"{JFK_PATH} is absent (it lives beside the checkout, in ../shared/data)")

    config = load_config(env={})
    spec = config.models_for(Capability.TRANSCRIPTION)[0]
    settings = FasterWhisperSettings.of(spec)
    model = WhisperModel(str(resolve_model_path(spec.path)), local_files_only=True, **model_kwargs(settings))
    language = "en" if not model.model.is_multilingual else ""
    kwargs = transcribe_kwargs(settings, DecodeOptions(language=language))
    data = JFK_PATH.read_bytes()

    stack = start_stack(Path(tempfile.mkdtemp(prefix="ark-bench-")))
    times: dict[str, list[float]] = {"in-process": [], "ARK": []}
    texts: dict[str, str] = {}
    try:
        with openai.OpenAI(base_url=stack.base_url, api_key=stack.api_key, max_retries=0, timeout=300) as client:
            for _ in range(2):  # warm both sides: first calls pay one-time allocations
                run_in_process(model, kwargs)
                run_through_ark(client, data)
            for _ in range(args.rounds):
                for side, run in (
                    ("in-process", lambda: run_in_process(model, kwargs)),
                    ("ARK", lambda: run_through_ark(client, data)),
                ):
                    seconds, texts[side] = run()
                    times[side].append(seconds)
    finally:
        stack.stop()

    setup = f"{settings.compute_type}, {settings.cpu_threads} threads, beam {settings.beam_size}"
    print(f"\nTranscription latency, Whisper tiny.en ({setup}), jfk.flac, {args.rounds} rounds")
    print(f"{'':12} {'median ms':>10} {'min ms':>8} {'max ms':>8}  WER")
    for side, samples in times.items():
        wer = word_error_rate(JFK_REFERENCE, texts[side])
        print(f"{side:12} {statistics.median(samples) * 1000:10.1f} {min(samples) * 1000:8.1f} ", end="")
        print(f"{max(samples) * 1000:8.1f}  {wer:.3f}")
    ratio = statistics.median(times["ARK"]) / statistics.median(times["in-process"])
    same = "same text" if texts["ARK"] == texts["in-process"] else "texts differ"
    print(f"\nratio ARK / in-process: {ratio:.3f}x   (goal <= {GOAL}x; {same})")


if __name__ == "__main__":
    main()
