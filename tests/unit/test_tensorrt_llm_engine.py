"""The TensorRT-LLM chat engine runs only where tensorrt_llm and an NVIDIA GPU exist."""

from __future__ import annotations

import importlib.util
import shutil

import pytest

from services.common.config import ModelConfig

HAS_TRTLLM = importlib.util.find_spec("tensorrt_llm") is not None
HAS_GPU = shutil.which("nvidia-smi") is not None


def test_selecting_tensorrt_llm_without_it_fails_clearly():
    if HAS_TRTLLM:
        pytest.skip("tensorrt_llm is installed here")
    from services.chat.engines import create_engine
    from services.common.errors import UnavailableError

    model = ModelConfig(id="m", capability="chat", engine="tensorrt_llm", path="/nonexistent")
    with pytest.raises(UnavailableError, match="tensorrt-llm"):
        create_engine(model, max_queue=1)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_TRTLLM and HAS_GPU), reason="needs the tensorrt_llm package and an NVIDIA GPU")
async def test_tensorrt_llm_generates():  # pragma: no cover - GPU only
    from services.chat.domain import Delta, GenerationRequest, Message, Role, Sampling
    from services.chat.engines import create_engine

    model = ModelConfig(id="m", capability="chat", engine="tensorrt_llm", path="HuggingFaceTB/SmolLM2-135M-Instruct")
    engine = create_engine(model, max_queue=4)
    request = GenerationRequest("r", "m", (Message(Role.USER, "What is the capital of France?"),), Sampling(0.0))
    text = "".join([e.text async for e in engine.generate(request) if isinstance(e, Delta)])
    assert "Paris" in text
