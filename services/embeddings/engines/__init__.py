"""Embeddings engines, chosen by configuration. Engine libraries are imported only when selected, so a CPU machine
never needs TensorRT-LLM installed and a GPU image never imports sentence-transformers."""

from __future__ import annotations

from services.common.config import EngineKind, ModelConfig
from services.common.errors import ArkError
from services.embeddings.engines.base import EmbeddingsEngine
from services.embeddings.settings import EmbeddingsSettings


def create_engine(model: ModelConfig, settings: EmbeddingsSettings) -> EmbeddingsEngine:
    """Load the engine named by `model.engine` (this loads the weights)."""
    if model.engine is EngineKind.SENTENCE_TRANSFORMERS:
        from services.embeddings.engines.sentence_transformers import SentenceTransformersEngine

        return SentenceTransformersEngine(model, settings)
    if model.engine is EngineKind.TENSORRT_LLM:
        from services.embeddings.engines.tensorrt_llm import TensorRTLLMEngine

        return TensorRTLLMEngine(model, settings)
    raise ArkError(f"engine {model.engine} cannot serve embeddings models")


__all__ = ["EmbeddingsEngine", "create_engine"]
