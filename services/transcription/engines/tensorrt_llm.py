"""Whisper on NVIDIA GPUs with TensorRT-LLM, after TensorRT-LLM's own example (`examples/models/core/whisper`).

Selected with `engine: tensorrt_llm` on a transcription model; `path` is an engine directory built by
`trtllm-build` as the example describes (`encoder/` and `decoder/`, each with `config.json` and `rank0.engine`),
and `settings.assets_dir` holds Whisper's `mel_filters.npz` and the model's `tokenizer.json`. `tensorrt_llm` and
`torch` are imported only in the constructor, so CPU machines never need them.

As in the example, audio is cut into 30-second windows, each turned into a log-Mel spectrogram on the GPU and
decoded with `ModelRunnerCpp` (encoder-decoder, in-flight batching) without timestamp tokens: one segment per
window, no word timestamps and no voice activity detection (the capabilities say so, and the service refuses such
requests before any work is done).

The decoder's length limits are read from the built engine and Whisper's own: the decoder input (previous-text
prompt and the start-of-transcript sequence) fits the engine's `max_input_len`, and input plus new tokens fit
its `max_seq_len` and Whisper's 448 positions; the previous text is cut from the front, as Whisper does.

Uses `tensorrt_llm.runtime.ModelRunnerCpp` and engines built with `trtllm-build`: TensorRT-LLM's TensorRT backend,
shipped up to the 1.2 releases (ARK pins 1.2.1) and removed from the releases after them.

Verified on CPU only with a fake runner (tests/unit/test_transcription_tensorrt_llm.py: budgets, language
detection); the GPU test skips without a GPU and a built engine (see docs/transcriptions.md).
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.common.config import ModelConfig, resolve_model_path
from services.common.errors import ArkError, UnavailableError
from services.transcription import domain
from services.transcription.domain import AUDIO_TOKENS_PER_SECOND, SAMPLE_RATE, DecodedAudio, DecodeOptions
from services.transcription.engines.base import EngineCapabilities, EngineEvent, TranscriptionEngine
from services.transcription.languages import WHISPER_LANGUAGES
from services.transcription.settings import TensorRTLLMWhisperSettings

WINDOW_SAMPLES = 30 * SAMPLE_RATE
N_FFT, HOP_LENGTH = 400, 160
# Whisper's decoder has 448 positions (n_text_ctx); as in Whisper, the previous text keeps at most half of them
# minus the <|startofprev|> token.
N_TEXT_CTX = 448
MAX_PROMPT_TOKENS = N_TEXT_CTX // 2 - 1


class TensorRTLLMWhisperEngine(TranscriptionEngine):
    def __init__(self, model: ModelConfig) -> None:
        try:
            import torch
            from tensorrt_llm.runtime import ModelRunnerCpp
            from tokenizers import Tokenizer
        except ImportError as exc:  # pragma: no cover - depends on the machine
            raise UnavailableError(
                "engine tensorrt_llm needs the `tensorrt-llm` package and an NVIDIA GPU: "
                "use the GPU image (deploy/docker/Dockerfile.gpu)"
            ) from exc
        settings = TensorRTLLMWhisperSettings.of(model)
        self.model_id = model.id
        self.max_queue = settings.max_queue
        self._settings = settings
        self._torch = torch
        engine_dir = resolve_model_path(model.path)
        assets = resolve_model_path(settings.assets_dir)
        encoder = _pretrained_config(engine_dir / "encoder")
        decoder = _pretrained_config(engine_dir / "decoder")
        self._n_mels = int(encoder["n_mels"])
        self._limits = DecoderLimits.from_config(decoder)
        self._device = "cuda"
        multilingual = int(decoder["vocab_size"]) >= 51865
        self._tokenizer = Tokenizer.from_file(str(assets / "tokenizer.json"))
        with np.load(assets / "mel_filters.npz") as filters:
            self._mel_filters = torch.from_numpy(filters[f"mel_{self._n_mels}"]).cuda()
        self._window = torch.hann_window(N_FFT).cuda()
        self._special = {name: self._tokenizer.token_to_id(f"<|{name}|>") for name in _SPECIAL}
        self._multilingual = multilingual
        self._runner = ModelRunnerCpp.from_dir(str(engine_dir), **runner_options(settings))
        self.capabilities = EngineCapabilities(
            languages=frozenset(WHISPER_LANGUAGES) if multilingual else frozenset({"en"}),
            word_timestamps=False,
            voice_activity_detection=False,
        )
        self._lock = threading.Lock()

    async def transcribe(self, audio: DecodedAudio, options: DecodeOptions) -> AsyncIterator[EngineEvent]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[EngineEvent | BaseException] = asyncio.Queue()
        abort = threading.Event()

        def post(item: EngineEvent | BaseException) -> None:
            loop.call_soon_threadsafe(events.put_nowait, item)

        job = asyncio.create_task(asyncio.to_thread(self._run, audio, options, abort, post))
        try:
            while True:
                item = await events.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, domain.Usage):
                    return
        finally:
            abort.set()
            await asyncio.shield(job)

    def _run(
        self,
        audio: DecodedAudio,
        options: DecodeOptions,
        abort: threading.Event,
        post: Callable[[EngineEvent | BaseException], None],
    ) -> None:
        try:
            with self._lock:
                windows = [audio.samples[i : i + WINDOW_SAMPLES] for i in range(0, len(audio.samples), WINDOW_SAMPLES)]
                mels = [self._log_mel(w) for w in windows]
                language = options.language or (self._detect_language(mels[0]) if self._multilingual else "en")
                post(domain.Started(language=language, duration_seconds=audio.duration_seconds))
                prompt = self._prompt(options)
                decoder_input, max_new_tokens = self._limits.fit(prompt, self._prefix(language), self._settings)
                output_tokens = 0
                for index, mel in enumerate(mels):
                    if abort.is_set():
                        return
                    tokens = self._generate(decoder_input, mel, max_new_tokens)
                    output_tokens += len(tokens)
                    start = index * 30.0
                    post(
                        domain.Segment(
                            id=index,
                            seek=index * 3000,
                            start=start,
                            end=min(start + 30.0, audio.duration_seconds),
                            text=" " + self._tokenizer.decode(tokens).strip(),
                            tokens=tuple(tokens),
                            temperature=0.0,
                            avg_logprob=0.0,
                            compression_ratio=0.0,
                            no_speech_prob=0.0,
                        )
                    )
                post(
                    domain.Usage(
                        input_text_tokens=max(0, len(decoder_input) - len(self._prefix(language)) - 1),
                        input_audio_tokens=math.ceil(audio.duration_seconds * AUDIO_TOKENS_PER_SECOND),
                        output_tokens=output_tokens,
                    )
                )
        except BaseException as exc:
            post(exc)

    def _log_mel(self, samples: np.ndarray) -> Any:
        """Whisper's log-Mel spectrogram of one window, padded to 30 s (the example's `log_mel_spectrogram`)."""
        torch = self._torch
        audio = torch.from_numpy(np.pad(samples, (0, WINDOW_SAMPLES - len(samples)))).cuda()
        stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=self._window, return_complex=True)
        power = stft[..., :-1].abs() ** 2
        log_spec = torch.clamp(self._mel_filters @ power, min=1e-10).log10()
        log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
        return ((log_spec + 4.0) / 4.0).half()

    def _prompt(self, options: DecodeOptions) -> list[int]:
        text = " ".join(filter(None, [options.prompt.strip(), *options.keywords]))
        if not text:
            return []
        ids = self._tokenizer.encode(" " + text, add_special_tokens=False).ids
        return [self._special["startofprev"], *ids[-MAX_PROMPT_TOKENS:]]

    def _prefix(self, language: str) -> list[int]:
        if not self._multilingual:
            return [self._special["startoftranscript"], self._special["notimestamps"]]
        lang = self._tokenizer.token_to_id(f"<|{language}|>")
        return [self._special["startoftranscript"], lang, self._special["transcribe"], self._special["notimestamps"]]

    def _detect_language(self, mel: Any) -> str:
        """The decoder's most likely token after <|startoftranscript|> is the language token (Whisper's own way).

        Language tokens come after <|endoftext|> in Whisper's vocabulary, so the token is read raw, before the
        filter that drops special tokens from transcripts. A token that is not a language ARK knows (rare: the
        model is trained to put one there) falls back to English.
        """
        tokens = self._generate([self._special["startoftranscript"]], mel, 1, keep_special=True)
        name = self._tokenizer.id_to_token(tokens[0]) if tokens else None
        return language_of_token(name) or "en"

    def _generate(self, prompt: list[int], mel: Any, max_new_tokens: int, *, keep_special: bool = False) -> list[int]:
        torch = self._torch
        eot = self._special["endoftext"]
        outputs = self._runner.generate(
            batch_input_ids=[torch.tensor(prompt, dtype=torch.int32)],
            encoder_input_features=[mel.transpose(0, 1).contiguous()],
            encoder_output_lengths=torch.tensor([mel.shape[1] // 2], dtype=torch.int32, device=self._device),
            max_new_tokens=max_new_tokens,
            end_id=eot,
            pad_id=eot,
            num_beams=self._settings.num_beams,
            output_sequence_lengths=True,
            return_dict=True,
        )
        if self._device == "cuda":
            torch.cuda.synchronize()
        length = int(outputs["sequence_lengths"][0][0])
        ids = outputs["output_ids"][0][0][len(prompt) : length].tolist()
        return ids if keep_special else [t for t in ids if t < eot]


_SPECIAL = ("startoftranscript", "startofprev", "transcribe", "notimestamps", "endoftext")


def runner_options(settings: TensorRTLLMWhisperSettings) -> dict[str, Any]:
    """`ModelRunnerCpp.from_dir` options, as TensorRT-LLM's Whisper example sets them (one request at a time)."""
    return {
        "is_enc_dec": True,
        "max_batch_size": 1,
        "max_input_len": 3000,  # encoder frames: 30 s of audio
        "max_output_len": settings.max_new_tokens,
        "max_beam_width": settings.num_beams,
        "kv_cache_free_gpu_memory_fraction": settings.kv_cache_free_gpu_memory_fraction,
        "cross_kv_cache_fraction": 0.5,
    }


def language_of_token(name: str | None) -> str | None:
    """`de` for the token `<|de|>`; None for any token that is not a language Whisper knows."""
    if not name or not (name.startswith("<|") and name.endswith("|>")):
        return None
    code = name[2:-2]
    return code if code in WHISPER_LANGUAGES else None


@dataclass(frozen=True, slots=True)
class DecoderLimits:
    """How many tokens the built decoder takes in (`max_input_len`) and holds in all (`max_seq_len`)."""

    max_input_len: int
    max_seq_len: int

    @classmethod
    def from_config(cls, decoder: dict[str, Any]) -> DecoderLimits:
        """From the decoder's config.json (pretrained and build sections merged); Whisper's 448 bounds both."""
        positions = min(int(decoder.get("max_position_embeddings", N_TEXT_CTX)), N_TEXT_CTX)
        max_seq_len = min(int(decoder.get("max_seq_len", positions)), positions)
        return cls(
            max_input_len=min(int(decoder.get("max_input_len", max_seq_len)), max_seq_len), max_seq_len=max_seq_len
        )

    def fit(self, prompt: list[int], prefix: list[int], settings: TensorRTLLMWhisperSettings) -> tuple[list[int], int]:
        """The decoder input (the previous-text prompt cut from the front, then `prefix`) and the new-token budget.

        `prompt` is `[<|startofprev|>, *text]`. The input never exceeds `max_input_len`; input plus new tokens never
        exceed `max_seq_len`. A prompt that leaves no room is dropped whole rather than sent cut to its marker.
        """
        room = self.max_input_len - len(prefix)
        if room < 0:
            raise ArkError(f"the Whisper decoder takes at most {self.max_input_len} input tokens; rebuild it larger")
        text = prompt[1:][-min(MAX_PROMPT_TOKENS, max(room - 1, 0)) :] if room > 1 and len(prompt) > 1 else []
        decoder_input = ([prompt[0], *text] if text else []) + prefix
        max_new_tokens = min(settings.max_new_tokens, self.max_seq_len - len(decoder_input))
        if max_new_tokens < 1:
            raise ArkError(f"the Whisper decoder holds at most {self.max_seq_len} tokens; rebuild it larger")
        return decoder_input, max_new_tokens


def _pretrained_config(component: Path) -> dict[str, Any]:
    config = json.loads((component / "config.json").read_text())
    return {**config["pretrained_config"], **config.get("build_config", {})}
