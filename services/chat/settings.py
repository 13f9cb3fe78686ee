"""The `settings` of a chat model in the configuration, one model per engine, checked when the configuration loads.

This module imports no engine library, so every process checks every model's settings before any model loads.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from services.common.config import EngineSettings

Threads = int | Literal["auto"]
# TensorRT-LLM 1.2.1's TorchLlmArgs.max_num_tokens when unset: the most prompt tokens one forward pass takes.
RELEASE_MAX_NUM_TOKENS = 8192


class LlamaCppSettings(EngineSettings):
    """`settings:` of a llama_cpp chat model (docs/configuration.md)."""

    n_ctx: Annotated[int, Field(ge=0)] = 8192  # window of one sequence in tokens (0: the one the model was trained for)
    # Sequences one worker decodes together in one batched step (continuous batching); more requests queue.
    # `auto`: 16 per decoding thread, at most 64 (services/common/cpu.py).
    n_seq: Annotated[int, Field(ge=1, le=128)] | Literal["auto"] = "auto"
    # CPU threads for decoding; `auto`: this machine's cores shared by the chat workers on it (services/common/cpu.py).
    n_threads: Threads = "auto"
    n_batch: Annotated[int, Field(ge=1)] = 512  # prompt tokens evaluated per step
    # Threads for prompts; unset: as many as for decoding (the library's own default, every core of the machine,
    # oversubscribes it as soon as two workers share it).
    n_threads_batch: Threads | None = None
    # KV memory kept between requests: conversations between turns (resident sequences of the worker's one context)
    # and idle sequences' prompt caches, shared by the sequences running. Small: every running row pays for every idle
    # cell, and a state saved to host memory loads back in milliseconds.
    session_kv_budget_mb: Annotated[float, Field(gt=0)] = 50

    @field_validator("n_threads", "n_threads_batch", mode="before")
    @classmethod
    def _a_positive_count_or_auto(cls, value: Any) -> Any:
        if value is None or value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            return value
        raise ValueError("a positive number of threads or 'auto'")


class TensorRTLLMChatSettings(EngineSettings):
    """`settings:` of a tensorrt_llm chat model (docs/configuration.md)."""

    max_batch_size: Annotated[int, Field(ge=1)] = 64  # requests batched in flight
    max_seq_len: Annotated[int, Field(ge=16)] = 8192  # prompt + completion
    max_num_tokens: Annotated[int, Field(ge=1)] | None = None
    host_cache_size: Annotated[int, Field(ge=0)] = 8 * 1024**3  # bytes of host memory for offloaded KV blocks
    free_gpu_memory_fraction: Annotated[float, Field(gt=0, le=1)] = 0.9
    # TensorRT-LLM's default sampler ignores min_p, seed and the penalties in 1.2.1; TRTLLMSampler applies them.
    sampler_type: Literal["TorchSampler", "TRTLLMSampler"] = "TorchSampler"
    # Retention priority (TensorRT-LLM's scale 0..100, default 35) of a session's blocks during its idle timeout.
    session_priority: Annotated[int, Field(ge=36, le=100)] = 80
    # Conversations kept resident (their token lists; the KV blocks live in TensorRT-LLM's shared cache). The
    # layer matches each request against every state of its API key, so this also bounds that scan.
    session_slots: Annotated[int, Field(ge=0)] = 64
    tensor_parallel_size: Annotated[int, Field(ge=1)] = 1
    # Further `LLM(...)` arguments, passed as they are (TensorRT-LLM validates them).
    llm_args: dict[str, Any] = {}

    @model_validator(mode="after")
    def _long_prompts_fit_a_forward_pass(self) -> TensorRTLLMChatSettings:
        """Without chunked prefill, 1.2.1's `LLM._check_arguments` refuses inside `generate_async` (a ValueError,
        after the request was accepted) every prompt longer than `max_num_tokens`: a model that turns chunking off
        must take `max_seq_len` tokens in one pass, or fail at start here."""
        if self.llm_args.get("enable_chunked_prefill", True):
            return self
        batch = self.llm_args.get("max_num_tokens") or self.max_num_tokens or RELEASE_MAX_NUM_TOKENS
        if batch < self.max_seq_len:
            raise ValueError(
                f"llm_args.enable_chunked_prefill: without chunked prefill, max_num_tokens ({batch}) must be at least "
                f"max_seq_len ({self.max_seq_len}), or longer prompts fail in TensorRT-LLM"
            )
        return self
