"""The `settings` of a transcription model in the configuration, one model per engine, checked when the
configuration loads.

This module imports no engine library, so every process checks every model's settings before any model loads.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from services.common.config import EngineSettings


class FasterWhisperSettings(EngineSettings):
    """`settings:` of a faster_whisper model in the configuration."""

    device: str = "cpu"
    compute_type: str = "int8"
    # 0 lets CTranslate2 decide; the default machine has 2 cores.
    cpu_threads: Annotated[int, Field(ge=0)] = 2
    beam_size: Annotated[int, Field(ge=1, le=16)] = 5
    max_queue: Annotated[int, Field(ge=0)] = 16
    # Silero voice activity detection (shipped with faster-whisper) before decoding, also when the client asks for
    # no `chunking_strategy`: Whisper fed silence invents words ("You You You…"), and 29 minutes of silence held the
    # model for 83 s; with it, 15 s and an empty transcript. A client's `server_vad` parameters still apply.
    vad_filter: bool = True


class TensorRTLLMWhisperSettings(EngineSettings):
    """`settings:` of a tensorrt_llm transcription model."""

    assets_dir: str = Field(min_length=1, description="path or package:… holding mel_filters.npz and tokenizer.json")
    num_beams: Annotated[int, Field(ge=1, le=8)] = 1
    max_new_tokens: Annotated[int, Field(ge=1, le=224)] = 224
    kv_cache_free_gpu_memory_fraction: Annotated[float, Field(gt=0, le=1)] = 0.9
    max_queue: Annotated[int, Field(ge=0)] = 16
