"""Chat engines, chosen by configuration. Engine libraries are imported only when selected, so a CPU machine never
needs TensorRT-LLM installed and a GPU image never loads llama.cpp."""

from __future__ import annotations

from services.chat.engines.base import ChatEngine
from services.common.config import EngineKind, ModelConfig
from services.common.errors import ArkError


def create_engine(model: ModelConfig) -> ChatEngine:
    """Load the engine named by `model.engine` (this loads the weights: seconds to minutes)."""
    if model.engine is EngineKind.LLAMA_CPP:
        from services.chat.engines.llama_cpp import LlamaCppEngine

        return LlamaCppEngine(model)
    if model.engine is EngineKind.TENSORRT_LLM:
        from services.chat.engines.tensorrt_llm import TensorRTLLMEngine

        return TensorRTLLMEngine(model)
    raise ArkError(f"engine {model.engine} cannot serve chat models")


__all__ = ["ChatEngine", "create_engine"]
