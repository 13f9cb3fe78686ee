"""The TensorRT-LLM Whisper engine is imported lazily and runs only where tensorrt_llm and an NVIDIA GPU exist."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import sys

import pytest

from services.common.config import ModelConfig

HAS_TRTLLM = importlib.util.find_spec("tensorrt_llm") is not None
HAS_GPU = shutil.which("nvidia-smi") is not None
HAS_ENGINE = bool(os.environ.get("ARK_TRTLLM_WHISPER_ENGINE") and os.environ.get("ARK_TRTLLM_WHISPER_ASSETS"))


def test_importing_the_engine_module_does_not_import_tensorrt_llm():
    importlib.import_module("services.transcription.engines.tensorrt_llm")
    assert HAS_TRTLLM or "tensorrt_llm" not in sys.modules


def test_selecting_tensorrt_llm_without_it_fails_clearly():
    if HAS_TRTLLM:
        pytest.skip("tensorrt_llm is installed here")
    from services.common.errors import UnavailableError
    from services.transcription.engines import create_engine

    model = ModelConfig(id="w", capability="transcription", engine="tensorrt_llm", path="/nonexistent")
    with pytest.raises(UnavailableError, match="tensorrt-llm"):
        create_engine(model)


@pytest.mark.gpu
@pytest.mark.skipif(
    not (HAS_TRTLLM and HAS_GPU and HAS_ENGINE),
    reason="needs the tensorrt_llm package, an NVIDIA GPU and a Whisper engine built with trtllm-build "
    "($ARK_TRTLLM_WHISPER_ENGINE, assets in $ARK_TRTLLM_WHISPER_ASSETS)",
)
async def test_tensorrt_llm_transcribes_jfk():  # pragma: no cover - GPU only
    from services.common.config import LimitsConfig
    from services.transcription.domain import Finished, TranscriptionRequest
    from services.transcription.engines import create_engine
    from services.transcription.transcriber import Transcriber
    from tests.support.audio import JFK_REFERENCE, jfk_bytes, word_error_rate

    model = ModelConfig(
        id="w",
        capability="transcription",
        engine="tensorrt_llm",
        path=os.environ["ARK_TRTLLM_WHISPER_ENGINE"],
        settings={"assets_dir": os.environ["ARK_TRTLLM_WHISPER_ASSETS"]},
    )
    transcriber = Transcriber(create_engine(model), LimitsConfig())
    events = [e async for e in transcriber.transcribe(TranscriptionRequest("r", "w", jfk_bytes()))]
    finished = events[-1]
    assert isinstance(finished, Finished)
    assert word_error_rate(JFK_REFERENCE, finished.text) <= 0.1
