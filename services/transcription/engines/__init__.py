"""Transcription engines, chosen by configuration. Engine libraries are imported only when selected, so a CPU machine
never needs TensorRT-LLM installed and a GPU image never loads CTranslate2."""

from __future__ import annotations

from services.common.config import EngineKind, ModelConfig
from services.common.errors import ArkError
from services.transcription.engines.base import EngineCapabilities, TranscriptionEngine


def create_engine(model: ModelConfig) -> TranscriptionEngine:
    """Load the engine named by `model.engine` (this loads the weights)."""
    if model.engine is EngineKind.FASTER_WHISPER:
        from services.transcription.engines.faster_whisper import FasterWhisperEngine

        return FasterWhisperEngine(model)
    if model.engine is EngineKind.TENSORRT_LLM:
        from services.transcription.engines.tensorrt_llm import TensorRTLLMWhisperEngine

        return TensorRTLLMWhisperEngine(model)
    raise ArkError(f"engine {model.engine} cannot serve transcription models")


__all__ = ["EngineCapabilities", "TranscriptionEngine", "create_engine"]
