"""Chat on NVIDIA GPUs with TensorRT-LLM's LLM API (PyTorch backend, Hugging Face checkpoint), pinned to 1.2.1.

Selected with `engine: tensorrt_llm`; `tensorrt_llm` is imported only when the engine is constructed, and this
module imports no other engine, so a GPU image never loads llama.cpp. Everything that is not library-specific
(sessions and transcripts, tools, `n`, stop strings, the context budget, the error order) lives in the generation
layer above (services/chat/generator.py); this adapter maps one `EngineRun` onto one `generate_async` call:

- the prompt is the layer's token ids (a session's raw transcript tokens included), never re-rendered here;
- `n` → `SamplingParams.n`, each `CompletionOutput.index` a choice, read from its `token_ids` past what was already
  reported (1.2.1 advances `token_ids_diff` only for the sequence a response is about) and ended by its own end
  token or budget (`finish_reason` arrives only when every sequence has finished); `n > 1` with greedy parameters
  (temperature 0, top_k 1, top_p 0) is refused (400) as `SamplingParams._validate` would refuse it later;
- long prompts → chunked prefill, so a prompt longer than `max_num_tokens` still runs (the 400 for the context
  window comes before the engine);
- temperature 0 → greedy (`top_k=1`); `max_tokens` is always set (TensorRT-LLM's default is 32);
- logprobs → `SamplingParams.logprobs` (the top count), read from `CompletionOutput.logprobs` at each new token's
  position; under `TRTLLMSampler` only the sampled token's (top_logprobs above 1 is refused, 400);
- `logit_bias` → a logits processor adding the biases to the logits in place;
- JSON modes and tools → the layer's llguidance grammar as `GuidedDecodingParams(grammar=...)`, with
  `guided_decoding_backend="llguidance"` on the `LLM` (without it the grammar would be ignored);
- `cached_tokens` → `RequestOutput.cached_tokens` of the first output, reported before any token;
- `cache_salt` → the API key's hash, or None without one (an empty salt is not "no salt");
- sessions → a `KvCacheRetentionConfig` raising the priority of the prompt's and the reply's blocks for the
  session's idle timeout, with `KvCacheConfig(enable_block_reuse=True, host_cache_size=...)` so they survive
  other traffic on the GPU or in host memory;
- end of generation: the end token is reported once as a sample (it belongs to the transcript), whether
  TensorRT-LLM keeps it in `token_ids` (the PyTorch sampler writes it) or leaves it out;
- 1.2.1's default sampler (`TorchSampler`) ignores min_p, per-request seeds and the three penalties: a request
  setting them is refused (400, naming the parameter) unless the model runs `sampler_type: TRTLLMSampler`, which
  honours them.

Checked on CPU against a stub built from the recorded 1.2.1 API (tests/unit/test_tensorrt_llm_engine.py); not run
on a GPU here (docs/architecture.md says which parts are verified how).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from services.chat.domain import GenerationRequest, Sampling
from services.chat.engines.base import (
    ChatEngine,
    EngineEvent,
    EngineRun,
    PromptReuse,
    SequenceEnd,
    TokenSample,
    TopLogprob,
)
from services.chat.settings import TensorRTLLMChatSettings
from services.common.config import ModelConfig, resolve_model_path
from services.common.errors import InvalidRequestError, UnavailableError, UnsupportedParameterError


class TensorRTLLMEngine(ChatEngine):
    def __init__(self, model: ModelConfig) -> None:
        settings = TensorRTLLMChatSettings.of(model)
        try:
            import tensorrt_llm
            from tensorrt_llm.llmapi import KvCacheConfig, KvCacheRetentionConfig
            from tensorrt_llm.sampling_params import GuidedDecodingParams
            from transformers import AutoTokenizer
        except ImportError as exc:  # pragma: no cover - depends on the machine
            raise UnavailableError(
                "engine tensorrt_llm needs the `tensorrt-llm` package and an NVIDIA GPU: "
                "use the GPU image (deploy/docker/Dockerfile.gpu)"
            ) from exc
        checkpoint = resolve_model_path(model.path)
        self.model_id = model.id
        self._settings = settings
        self._tllm = tensorrt_llm
        self._guided_cls = GuidedDecodingParams
        self._retention_cls = KvCacheRetentionConfig
        self._tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
        self._pieces = token_pieces(self._tokenizer)
        self.vocab_size = len(self._pieces)
        self.eog_token = int(self._tokenizer.eos_token_id)
        self._eog = frozenset({self.eog_token, *_generation_eos(checkpoint)})
        self.context_window = settings.max_seq_len
        self.max_concurrency = settings.max_batch_size
        self.context_slots = settings.session_slots
        extra = {"max_num_tokens": settings.max_num_tokens} if settings.max_num_tokens else {}
        extra.update(_chunked_prefill(settings))
        self._llm = tensorrt_llm.LLM(
            model=str(checkpoint),
            tensor_parallel_size=settings.tensor_parallel_size,
            max_batch_size=settings.max_batch_size,
            max_seq_len=settings.max_seq_len,
            kv_cache_config=KvCacheConfig(
                enable_block_reuse=True,
                host_cache_size=settings.host_cache_size,
                free_gpu_memory_fraction=settings.free_gpu_memory_fraction,
            ),
            # ARK's constraints are llguidance grammars (services/chat/constraints.py).
            guided_decoding_backend="llguidance",
            sampler_type=settings.sampler_type,
            **extra,
            **settings.llm_args,
        )

    # -- prompt ---------------------------------------------------------------------------------------------------

    def render(self, messages: Sequence[dict[str, Any]], *, open_turn: bool = True) -> str:
        return self._tokenizer.apply_chat_template(list(messages), add_generation_prompt=open_turn, tokenize=False)

    def tokenize(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def encode_prompt(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        # Chat templates write the beginning-of-sequence token themselves where the model needs one.
        return self.tokenize(self.render(messages))

    def is_eog(self, token: int) -> bool:
        return token in self._eog

    def validate(self, request: GenerationRequest) -> None:
        s = request.sampling
        if s.n > 1 and (greedy := _greedy_parameter(s)):
            # SamplingParams._validate raises for this ("Greedy decoding in the LLM API does not allow multiple
            # returns") inside generate_async, after the request was accepted.
            raise InvalidRequestError(
                f"n > 1 needs sampling, but {greedy} makes TensorRT-LLM decode greedily: every choice would be the "
                "same answer. Raise it (temperature above 0, top_p above 0, top_k other than 1) or ask for one choice.",
                param="n",
            )
        if self._settings.sampler_type == "TorchSampler":
            for param in _ignored_by_torch_sampler(s):
                raise UnsupportedParameterError(
                    f"'{param}' is not applied by this model's sampler (TensorRT-LLM's TorchSampler); "
                    "the model's settings.sampler_type: TRTLLMSampler applies it.",
                    param=param,
                )
        elif s.logprobs and s.top_logprobs > 1:
            raise UnsupportedParameterError(
                "'top_logprobs' above 1 is not available with this model's sampler (TensorRT-LLM's TRTLLMSampler "
                "returns the sampled token's logprob only); ask for top_logprobs 0 or 1.",
                param="top_logprobs",
            )

    # -- generation -----------------------------------------------------------------------------------------------

    def sampling_params(self, job: EngineRun) -> Any:
        """The `SamplingParams` of one run."""
        s = job.sampling
        kwargs: dict[str, Any] = {
            "n": job.n,
            "max_tokens": job.max_new_tokens,  # always explicit: TensorRT-LLM's default is 32
            "end_id": self.eog_token,
            "stop_token_ids": sorted(self._eog - {self.eog_token}) or None,
            "detokenize": False,  # the layer assembles text from the tokens' bytes
        }
        if s.temperature == 0:
            kwargs["top_k"] = 1  # greedy
        else:
            kwargs.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
        if self._settings.sampler_type == "TRTLLMSampler":
            kwargs.update(
                seed=s.seed,
                min_p=s.min_p,
                presence_penalty=s.presence_penalty or None,
                frequency_penalty=s.frequency_penalty or None,
                repetition_penalty=s.repetition_penalty,
            )
        if s.logprobs:
            kwargs["logprobs"] = max(1, s.top_logprobs)
        if s.logit_bias:
            kwargs["logits_processor"] = LogitBias(s.logit_bias)
        if job.constraint is not None:
            kwargs["guided_decoding"] = self._guided_cls(grammar=job.constraint.grammar)
        return self._tllm.SamplingParams(**kwargs)

    def retention(self, seconds: float) -> Any:
        """Keep a session's blocks (prompt and reply) at raised priority for `seconds`; None: the default policy."""
        if seconds <= 0:
            return None
        duration = timedelta(seconds=seconds)
        priority = self._settings.session_priority
        whole = self._retention_cls.TokenRangeRetentionConfig(0, None, priority, duration)
        return self._retention_cls([whole], priority, duration)

    async def run(self, job: EngineRun) -> AsyncIterator[EngineEvent]:
        result = self._llm.generate_async(
            list(job.prompt),
            sampling_params=self.sampling_params(job),
            streaming=True,
            kv_cache_retention_config=self.retention(job.retention_seconds),
            cache_salt=job.cache_salt or None,
        )
        top = job.sampling.top_logprobs if job.sampling.logprobs else 0
        # Each choice's tokens already reported. Under `n > 1` the PyTorch backend answers one sequence per response
        # and advances only that output's `token_ids_diff`: the other outputs' diffs still hold their last tokens, so
        # they are read from `token_ids` past what was consumed, never from the diffs.
        consumed = [0] * job.n
        ended: set[int] = set()
        reported = finished = False
        generated: list[int] = []  # sequence 0's tokens: with the prompt, what a session's context now covers
        try:
            async for output in result:
                finished = bool(output.finished)
                if not reported:
                    yield PromptReuse(int(output.cached_tokens or 0))
                    reported = True
                for completion in output.outputs:
                    index = completion.index
                    if index in ended or index in job.stopped:
                        continue
                    tokens = completion.token_ids
                    logprobs = completion.logprobs if job.sampling.logprobs else None
                    start = consumed[index]
                    for position, token in enumerate(tokens[start:], start):
                        if index == 0:
                            generated.append(token)
                        entry = logprobs[position] if logprobs and position < len(logprobs) else None
                        yield self._sample(index, token, entry, top)
                    consumed[index] = max(start, len(tokens))
                    end = self._end(completion, tokens[-1] if tokens else None, consumed[index], job, finished)
                    if end is None:
                        continue
                    ended.add(index)
                    if end == "eog" and not (tokens and self.is_eog(tokens[-1])):
                        stop = completion.stop_reason if isinstance(completion.stop_reason, int) else None
                        token = stop if stop is not None else self.eog_token
                        if index == 0:
                            generated.append(token)
                        yield self._sample(index, token, None, 0)
                    yield SequenceEnd(index, end)
                if job.abort.is_set() or len(ended | job.stopped) >= job.n:
                    break
        except (asyncio.CancelledError, GeneratorExit):
            result.abort()
            raise
        finally:
            if isinstance(job.context, _SessionContext):
                job.context.tokens = (*job.prompt, *generated)
        if not finished:
            result.abort()  # the layer needs no more tokens: free the batch slot and the blocks now

    def _end(self, completion: Any, last: int | None, count: int, job: EngineRun, final: bool) -> str | None:
        """How one choice ended ("eog", "length", "stopped"), or None while it runs.

        1.2.1 sets `finish_reason` only once the whole request is final (`_done`), so under `n > 1` a choice that
        ends before the others never gets one; its end is read from its tokens instead: an end token (the PyTorch
        backend's sampler keeps it in `token_ids`) or the full budget. When the request is final, a choice still
        open ended on an end token that was left out of `token_ids`.
        """
        reason = completion.finish_reason
        if reason == "length":
            return "length"
        if reason == "stop" or (last is not None and self.is_eog(last)):
            return "eog"
        if reason is not None:
            return "stopped"  # timeout or cancelled: nothing more will come
        if count >= job.max_new_tokens:
            return "length"
        return "eog" if final else None

    def _sample(self, index: int, token: int, entry: Any, top: int) -> TokenSample:
        if entry is None:
            return TokenSample(index, token, self._pieces[token])
        if isinstance(entry, float):  # TRTLLMSampler's top-1 logprobs: the sampled token's value only
            return TokenSample(
                index,
                token,
                self._pieces[token],
                logprob=entry,
                top=(TopLogprob(token, self._pieces[token], entry),)[:top],
            )
        chosen = entry.get(token)
        ranked = sorted(entry.items(), key=lambda item: -item[1].logprob)[:top]
        return TokenSample(
            index,
            token,
            self._pieces[token],
            logprob=chosen.logprob if chosen is not None else None,
            top=tuple(TopLogprob(t, self._pieces[t], lp.logprob) for t, lp in ranked),
        )

    # -- per-context state --------------------------------------------------------------------------------------
    # TensorRT-LLM keeps every KV block in one shared cache (GPU, then host memory) and finds them again by prefix,
    # so a conversation's "context" here is only the list of tokens its blocks cover. Saving one to ARK's tiers
    # keeps that list and the transcript (so raw tokens are still replayed); the blocks stay TensorRT-LLM's, and
    # ones it has evicted are recomputed, which changes cost, never output.

    def new_context(self) -> Any:
        return _SessionContext()

    def reset_context(self, context: Any) -> None:
        context.tokens = ()

    def context_tokens(self, context: Any) -> Sequence[int]:
        return context.tokens

    def export_state(self, context: Any) -> bytes | None:
        return _IN_ENGINE_CACHE if context.tokens else None

    def import_state(self, context: Any, data: bytes, tokens: Sequence[int]) -> bool:
        if data != _IN_ENGINE_CACHE:
            return False
        context.tokens = tuple(tokens)
        return True

    async def close(self) -> None:
        self._llm.shutdown()


# What a saved state holds: nothing but the marker; its blocks live (or were evicted) in TensorRT-LLM's cache.
_IN_ENGINE_CACHE = b"tensorrt_llm:kv-cache"


class _SessionContext:
    """One conversation's place: the tokens whose KV blocks TensorRT-LLM's shared cache was last given."""

    __slots__ = ("tokens",)

    def __init__(self) -> None:
        self.tokens: tuple[int, ...] = ()


class LogitBias:
    """OpenAI's `logit_bias` as a TensorRT-LLM logits processor: adds each bias to its token's logit in place.

    A plain callable with the `LogitsProcessor.__call__` signature, as TensorRT-LLM accepts; the bias tensor is
    built once per device and dtype.
    """

    def __init__(self, bias: dict[int, float]) -> None:
        self._ids = list(bias)
        self._values = [float(v) for v in bias.values()]
        self._tensors: dict[tuple[Any, Any], tuple[Any, Any]] = {}

    def __call__(
        self, req_id: int, logits: Any, token_ids: list[list[int]], stream_ptr: int | None, client_id: int | None
    ) -> None:
        import torch

        key = (logits.device, logits.dtype)
        if key not in self._tensors:
            self._tensors[key] = (
                torch.tensor(self._ids, dtype=torch.long, device=logits.device),
                torch.tensor(self._values, dtype=logits.dtype, device=logits.device),
            )
        ids, values = self._tensors[key]
        if stream_ptr is not None and logits.is_cuda:  # pragma: no cover - GPU only
            with torch.cuda.stream(torch.cuda.ExternalStream(stream_ptr)):
                logits[..., ids] += values
        else:
            logits[..., ids] += values


def _chunked_prefill(settings: TensorRTLLMChatSettings) -> dict[str, Any]:
    """Chunked prefill on unless the model's `llm_args` say otherwise, so that any prompt within `max_seq_len` runs
    (ARK's prompt limit, checked before the engine: 400 `context_length_exceeded`); without it, 1.2.1 refuses
    inside `generate_async` every prompt longer than `max_num_tokens`. Turning it off is checked at configuration
    load (services/chat/settings.py)."""
    return {} if "enable_chunked_prefill" in settings.llm_args else {"enable_chunked_prefill": True}


def _greedy_parameter(s: Sampling) -> str:
    """The parameter that makes `SamplingParams` greedy (its `params_imply_greedy_decoding`), or "" if none does."""
    if s.temperature == 0:
        return "temperature 0"
    if s.top_k == 1:
        return "top_k 1"
    if s.top_p == 0:
        return "top_p 0"
    return ""


def _ignored_by_torch_sampler(s: Sampling) -> list[str]:
    """The parameters set in `s` that TensorRT-LLM 1.2.1's TorchSampler accepts but does not apply."""
    ignored = []
    if s.seed is not None:
        ignored.append("seed")
    if s.min_p:
        ignored.append("min_p")
    if s.presence_penalty:
        ignored.append("presence_penalty")
    if s.frequency_penalty:
        ignored.append("frequency_penalty")
    if s.repetition_penalty not in (None, 1.0):
        ignored.append("repetition_penalty")
    return ignored


def _generation_eos(checkpoint: Path) -> list[int]:
    """End tokens from the checkpoint's generation_config.json (instruct models often list several)."""
    config = checkpoint / "generation_config.json"
    if not config.is_file():
        return []
    eos = json.loads(config.read_text()).get("eos_token_id")
    return [int(t) for t in (eos if isinstance(eos, list) else [eos] if eos is not None else [])]


def token_pieces(tokenizer: Any) -> list[bytes]:
    """Each token id's bytes, for the layer's UTF-8 assembly (a piece may end inside a character).

    Byte-level BPE (GPT-2, Llama 3, SmolLM, Qwen) spells bytes as printable characters; SentencePiece (Llama 2,
    Mistral) writes a space as "▁" and odd bytes as "<0xNN>". Special tokens are their text.
    """
    size = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    special = {int(i) for i in tokenizer.added_tokens_decoder}
    decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    byte_level = "ByteLevel" in json.dumps(decoder)
    unicode_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    pieces = []
    for token_id, token in enumerate(tokens):
        token = token or ""
        if token_id in special:
            pieces.append(token.encode())
        elif byte_level:
            pieces.append(bytes(unicode_to_byte.get(c, 0) for c in token))
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            pieces.append(bytes([int(token[3:5], 16)]))
        else:
            pieces.append(token.replace("\u2581", " ").encode())
    return pieces


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (byte-level BPE vocabularies use it)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping
