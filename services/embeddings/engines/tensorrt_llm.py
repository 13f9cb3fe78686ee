"""BERT-family embeddings on NVIDIA GPUs through TensorRT-LLM's BERT engine path.

Follows TensorRT-LLM's `examples/models/core/bert` (convert_checkpoint.py → trtllm-build → run.py): `path` is the
folder `trtllm-build` wrote for a `BertModel` checkpoint (config.json and rank0.engine), built in padded mode
(without `--remove_input_padding`); `settings.tokenizer_path` is the original Hugging Face folder, for its
tokenizer and its sentence-transformers pooling. The engine returns `hidden_states`; pooling (mean, or [CLS] where
the model's 1_Pooling/config.json says so) and normalisation run here in torch on the GPU.

`tensorrt_llm` is imported only in the constructor, so CPU machines never need it. Not verified: no GPU is
available to ARK's CI; its test skips with that reason (docs/embeddings.md).

Uses `tensorrt_llm.runtime.Session` / `TensorInfo` and engines built with `trtllm-build`: TensorRT-LLM's TensorRT
backend, shipped up to the 1.2 releases (ARK pins 1.2.1) and removed from the releases after them; a later pin
needs this engine rewritten on the PyTorch backend.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.common.config import ConfigError, ModelConfig, resolve_model_path
from services.common.errors import UnavailableError
from services.embeddings.engines.base import EmbeddingsEngine
from services.embeddings.engines.tokenizer import ModelTokenizer
from services.embeddings.settings import TensorRTLLMEmbeddingsSettings


class TensorRTLLMEngine(EmbeddingsEngine):
    def __init__(self, model: ModelConfig, settings: TensorRTLLMEmbeddingsSettings) -> None:
        try:
            import tensorrt as trt
            import torch
            from tensorrt_llm.runtime import Session, TensorInfo
        except ImportError as exc:  # pragma: no cover - depends on the machine
            raise UnavailableError(
                "engine tensorrt_llm needs the `tensorrt-llm` package and an NVIDIA GPU: "
                "use the GPU image (deploy/docker/Dockerfile.gpu)"
            ) from exc
        if not torch.cuda.is_available():  # pragma: no cover - GPU only
            raise UnavailableError("engine tensorrt_llm needs an NVIDIA GPU; none is visible")
        engine_dir = resolve_model_path(model.path)
        config = json.loads((engine_dir / "config.json").read_text())
        pretrained, build = config["pretrained_config"], config["build_config"]
        if pretrained["architecture"] != "BertModel":
            raise ConfigError(f"models[{model.id}].path: needs a BertModel engine, not {pretrained['architecture']}")
        if build["plugin_config"].get("remove_input_padding"):
            raise ConfigError(f"models[{model.id}].path: build the engine without --remove_input_padding")
        hf_dir = resolve_model_path(settings.tokenizer_path)
        self._torch, self._trt, self._tensor_info = torch, trt, TensorInfo
        self._session = Session.from_serialized_engine((engine_dir / "rank0.engine").read_bytes())
        self._tokenizer = ModelTokenizer.from_file(str(hf_dir / "tokenizer.json"))
        self._cls_pooling = _uses_cls_pooling(hf_dir)
        self.model_id = model.id
        self.dimensions = int(pretrained["hidden_size"])
        self.max_sequence_length = min(int(build["max_input_len"]), _sentence_transformers_limit(hf_dir))
        self.vocab_size = int(pretrained["vocab_size"])
        self.max_batch_size = int(build["max_batch_size"])
        self.thread_safe = False  # one engine session and CUDA stream: one batch at a time

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return self._tokenizer.tokenize(texts)

    def add_special_tokens(self, ids: Sequence[int]) -> list[int]:
        return self._tokenizer.add_special_tokens(ids)

    def encode(self, batch: Sequence[Sequence[int]]) -> np.ndarray:  # pragma: no cover - GPU only
        torch, trt, info = self._torch, self._trt, self._tensor_info
        longest = max(len(seq) for seq in batch)
        ids = torch.zeros((len(batch), longest), dtype=torch.int32)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.int32)
        input_ids = ids.cuda()
        lengths = torch.tensor([len(seq) for seq in batch], dtype=torch.int32, device="cuda")
        inputs: dict[str, Any] = {
            "input_ids": input_ids,
            "input_lengths": lengths,
            "token_type_ids": torch.zeros_like(input_ids),
        }
        shapes = [info(name, trt.DataType.INT32, tensor.shape) for name, tensor in inputs.items()]
        outputs = {
            t.name: torch.empty(tuple(t.shape), dtype=_torch_dtype(torch, trt, t.dtype), device="cuda")
            for t in self._session.infer_shapes(shapes)
        }
        stream = torch.cuda.current_stream()
        if not self._session.run(inputs=inputs, outputs=outputs, stream=stream.cuda_stream):
            raise RuntimeError("TensorRT-LLM engine execution failed")
        stream.synchronize()
        hidden = outputs["hidden_states"].float()
        if self._cls_pooling:
            pooled = hidden[:, 0]
        else:
            mask = (torch.arange(longest, device="cuda")[None, :] < lengths[:, None]).unsqueeze(-1).float()
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1)
        return torch.nn.functional.normalize(pooled, dim=1).cpu().numpy()


def _torch_dtype(torch: Any, trt: Any, dtype: Any) -> Any:  # pragma: no cover - GPU only
    return {trt.float16: torch.float16, trt.float32: torch.float32, trt.int32: torch.int32}[dtype]


def _uses_cls_pooling(hf_dir: Path) -> bool:
    pooling = hf_dir / "1_Pooling" / "config.json"
    return pooling.is_file() and bool(json.loads(pooling.read_text()).get("pooling_mode_cls_token"))


def _sentence_transformers_limit(hf_dir: Path) -> int:
    """The sequence length the model was trained for (sentence_bert_config.json), else BERT's 512 positions."""
    config = hf_dir / "sentence_bert_config.json"
    return int(json.loads(config.read_text()).get("max_seq_length", 512)) if config.is_file() else 512
