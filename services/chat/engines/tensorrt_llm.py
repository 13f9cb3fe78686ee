"""Chat on NVIDIA GPUs with TensorRT-LLM's LLM API (PyTorch backend, Hugging Face checkpoint).

Selected with `engine: tensorrt_llm` in the configuration; `tensorrt_llm` is imported only here, when the engine is
constructed, so CPU machines never need it. TensorRT-LLM batches in flight by itself, so this engine admits up to
`max_batch_size` concurrent requests instead of one; a session's tokens get a raised KV-cache retention priority
for its idle timeout, and `cache_salt` keeps one API key's cached blocks from ever serving another.

Not verified on CPU: no GPU is available to ARK's CI (see docs/engines.md); its test skips with the reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from services.chat.engines.base import ChatEngine, EngineEvent, EngineRun, PromptReuse, SequenceEnd, TokenSample
from services.common.config import ModelConfig, resolve_model_path
from services.common.errors import UnavailableError, UnsupportedParameterError

_END = {"stop": "eog", "length": "length"}


class TensorRTLLMEngine(ChatEngine):
    def __init__(self, model: ModelConfig) -> None:
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
        self.max_concurrency = self._max_batch
        self.context_window = self._max_seq_len
        self.vocab_size = int(self._tokenizer.vocab_size)
        self.eog_token = int(self._tokenizer.eos_token_id)

    def render(self, messages, *, open_turn: bool = True) -> str:
        return self._tokenizer.apply_chat_template(list(messages), add_generation_prompt=open_turn, tokenize=False)

    def tokenize(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def encode_prompt(self, messages) -> list[int]:
        return list(self._tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True))

    def is_eog(self, token: int) -> bool:
        return token == self.eog_token

    def validate(self, request) -> None:
        if request.tools:
            raise UnsupportedParameterError("tools are not yet available on the tensorrt_llm engine", param="tools")

    def _guided(self, job: EngineRun) -> Any:
        """JSON modes through TensorRT-LLM's guided decoding."""
        from tensorrt_llm.sampling_params import GuidedDecodingParams

        if job.constraint is None:
            return None
        return GuidedDecodingParams(grammar=job.constraint.grammar)  # llguidance Lark

    def _sampling(self, job: EngineRun) -> Any:
        s = job.sampling
        return self._tllm.SamplingParams(
            n=max(1, job.n),
            logprobs=s.top_logprobs if s.logprobs else None,
            guided_decoding=self._guided(job),
            max_tokens=job.max_new_tokens,  # always explicit: TensorRT-LLM's default is 32
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            min_p=s.min_p,
            seed=s.seed,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            repetition_penalty=s.repetition_penalty,
        )

    async def run(self, job: EngineRun) -> AsyncIterator[EngineEvent]:
        result = self._llm.generate_async(
            list(job.prompt),
            sampling_params=self._sampling(job),
            streaming=True,
            cache_salt=job.cache_salt or None,
        )
        reported = False
        try:
            async for output in result:
                if not reported:
                    yield PromptReuse(int(getattr(output, "cached_tokens", 0) or 0))
                    reported = True
                for completion in output.outputs:
                    for token in completion.token_ids_diff:
                        yield TokenSample(completion.index, token, self._tokenizer.decode([token]).encode())
                    if completion.finish_reason:
                        yield SequenceEnd(completion.index, _END.get(completion.finish_reason, "eog"))
        except (asyncio.CancelledError, GeneratorExit):
            result.abort()
            raise

    async def close(self) -> None:
        self._llm.shutdown()
