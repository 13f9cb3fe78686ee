"""Embeddings engines, chosen by configuration. Engine libraries are imported only when selected, so a CPU machine
never needs TensorRT-LLM installed and a GPU image never imports sentence-transformers."""

from __future__ import annotations

import logging
import os
import sys

from services.common.config import ModelConfig
from services.common.errors import ArkError
from services.embeddings.engines.base import EmbeddingsEngine
from services.embeddings.settings import (
    EmbeddingsSettings,
    SentenceTransformersSettings,
    TensorRTLLMEmbeddingsSettings,
)

log = logging.getLogger(__name__)


def create_engine(model: ModelConfig, settings: EmbeddingsSettings) -> EmbeddingsEngine:
    """Load the engine named by `model.engine` with its settings (services/embeddings/settings.py); this loads the
    weights."""
    if isinstance(settings, SentenceTransformersSettings):
        configure_openmp(settings.openmp_spin_count)
        from services.embeddings.engines.sentence_transformers import SentenceTransformersEngine

        return SentenceTransformersEngine(model, settings)
    if isinstance(settings, TensorRTLLMEmbeddingsSettings):
        from services.embeddings.engines.tensorrt_llm import TensorRTLLMEngine

        return TensorRTLLMEngine(model, settings)
    raise ArkError(f"engine {model.engine} cannot serve embeddings models")


def configure_openmp(spin_count: int | None) -> None:
    """Set how long torch's idle OpenMP threads spin, before torch loads (OpenMP reads it once, at load).

    An operator's own GOMP_SPINCOUNT wins. Once torch is loaded (a test process that imported it earlier) the setting
    can no longer take effect, which is logged rather than silently ignored.
    """
    if spin_count is None or "GOMP_SPINCOUNT" in os.environ:
        return
    if "torch" in sys.modules:
        log.warning("openmp_spin_count=%d not applied: torch was loaded before the engine", spin_count)
        return
    os.environ["GOMP_SPINCOUNT"] = str(spin_count)
    log.info("OpenMP threads spin %d iterations before sleeping", spin_count)


__all__ = ["EmbeddingsEngine", "configure_openmp", "create_engine"]
