"""Chat on NVIDIA GPUs with TensorRT-LLM's LLM API (PyTorch backend, Hugging Face checkpoint).

Selected with `engine: tensorrt_llm` in the configuration; `tensorrt_llm` is imported only here, when the engine is
constructed, so CPU machines never need it. TensorRT-LLM batches in flight by itself, so this engine admits up to
`max_batch_size` concurrent requests instead of one; a session's tokens get a raised KV-cache retention priority
for its idle timeout, and `cache_salt` keeps one API key's cached blocks from ever serving another.

Not verified on CPU: no GPU is available to ARK's CI (see docs/engines.md); its test skips with the reason.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from services.chat.domain import (
    Delta,
    Finished,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    ResponseFormatType,
    Started,
    Timings,
    Usage,
)
from services.chat.engines.base import ChatEngine, EngineStatus
from services.chat.engines.llama_cpp import _to_template_message
from services.common.admission import Admission
from services.common.config import ModelConfig, resolve_model_path
from services.common.errors import InvalidRequestError, UnavailableError, UnsupportedParameterError

_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH}


class TensorRTLLMEngine(ChatEngine):
    def __init__(self, model: ModelConfig, *, max_queue: int) -> None:
        try:
            import tensorrt_llm
            from tensorrt_llm.llmapi import KvCacheConfig
        except ImportError as exc:  # pragma: no cover - depends on the machine
            raise UnavailableError(
                "engine tensorrt_llm needs the `tensorrt-llm` package and an NVIDIA GPU (pip install '.[gpu]')"
            ) from exc
        settings = dict(model.settings)
        self.model_id = model.id
        self._tllm = tensorrt_llm
        self._max_batch = int(settings.pop("max_batch_size", 64))
        self._max_seq_len = int(settings.pop("max_seq_len", 8192))
        host_cache = int(settings.pop("host_cache_size", 8 * 1024**3))
        self._llm = tensorrt_llm.LLM(
            model=str(resolve_model_path(model.path)),
            backend="pytorch",
            max_batch_size=self._max_batch,
            max_seq_len=self._max_seq_len,
            kv_cache_config=KvCacheConfig(enable_block_reuse=True, host_cache_size=host_cache),
            **settings,
        )
        self._tokenizer = self._llm.tokenizer
        self._admission = Admission(slots=self._max_batch, max_queue=max_queue)

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        messages = [_to_template_message(m) for m in request.messages]
        return self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)

    def _guided(self, request: GenerationRequest) -> Any:
        """JSON mode and JSON Schema through TensorRT-LLM's guided decoding (the llama.cpp engine uses GBNF)."""
        from tensorrt_llm.sampling_params import GuidedDecodingParams

        fmt = request.response_format
        if fmt.type is ResponseFormatType.JSON_OBJECT:
            return GuidedDecodingParams(json_object=True)
        if fmt.type is ResponseFormatType.JSON_SCHEMA:
            return GuidedDecodingParams(json=fmt.json_schema)
        return None

    def _sampling(self, request: GenerationRequest, budget: int) -> Any:
        s = request.sampling
        if request.tools:
            raise UnsupportedParameterError("tools are not yet available on the tensorrt_llm engine", param="tools")
        return self._tllm.SamplingParams(
            n=max(1, s.n),
            logprobs=s.top_logprobs if s.logprobs else None,
            guided_decoding=self._guided(request),
            max_tokens=budget,  # always explicit: TensorRT-LLM's default is 32
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            min_p=s.min_p,
            seed=s.seed,
            stop=list(s.stop) or None,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            repetition_penalty=s.repetition_penalty,
        )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        t_queued = time.perf_counter()
        async with self._admission.slot():
            t_admitted = time.perf_counter()
            ids = self._prompt_ids(request)
            room = self._max_seq_len - len(ids)
            if room <= 0 or (request.sampling.max_tokens or 0) > room:
                raise InvalidRequestError(
                    f"This model's maximum context length is {self._max_seq_len} tokens; the request needs more.",
                    param="messages",
                    code="context_length_exceeded",
                )
            budget = request.sampling.max_tokens or room
            yield Started(prompt_tokens=len(ids), cached_tokens=0)
            result = self._llm.generate_async(
                ids, sampling_params=self._sampling(request, budget), streaming=True, cache_salt=request.api_key_hash
            )
            generated, t_first, finish = 0, 0.0, FinishReason.LENGTH
            try:
                async for output in result:
                    completion = output.outputs[0]
                    t_first = t_first or time.perf_counter()
                    generated += len(completion.token_ids_diff)
                    if completion.text_diff or completion.token_ids_diff:
                        yield Delta(completion.text_diff, tuple(completion.token_ids_diff))
                    if completion.finish_reason:
                        finish = _FINISH.get(completion.finish_reason, FinishReason.STOP)
            except (asyncio.CancelledError, GeneratorExit):
                result.abort()
                raise
            cached = int(getattr(result, "cached_tokens", 0) or 0)
            t_end = time.perf_counter()
            yield Finished(
                finish,
                Usage(len(ids), generated, cached),
                Timings((t_first or t_end) - t_admitted, t_end - (t_first or t_end), t_admitted - t_queued),
            )

    async def drop_session(self, session_id: str) -> bool:
        return False

    def status(self) -> EngineStatus:
        return EngineStatus(session_capacity=0, resident_sessions=0, queued_requests=self._admission.queued)

    async def close(self) -> None:
        self._llm.shutdown()
