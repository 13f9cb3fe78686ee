"""Chat on CPU with llama.cpp (llama-cpp-python), using the model's own chat template from the GGUF metadata.

One llama.cpp context runs one generation at a time in a dedicated thread (the library is not thread-safe); other
requests wait their turn in a bounded FIFO queue. Tokens travel from that thread to the event loop as they are
sampled, and an abort flag checked before every token stops generation within one token of a cancellation.

The context's KV cache is reused across requests when the new prompt shares a prefix with what the context last
held (llama-cpp-python compares token ids), but never across API keys: one tenant's cache never serves another.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_grammar import LlamaGrammar

from services.chat.constraints import Constraint, build_constraint
from services.chat.domain import (
    Delta,
    Finished,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    Message,
    PositionLogprobs,
    Role,
    Sampling,
    Started,
    Timings,
    TokenLogprob,
    ToolChoiceMode,
    Usage,
)
from services.chat.engines.base import ChatEngine, EngineStatus
from services.chat.engines.llama_context import ArkLlama
from services.chat.session_pool import Resident, SessionPool
from services.chat.text import StopMatcher, Utf8Stream
from services.chat.tools import ToolCallParser, tool_instructions
from services.chat.transcript import Transcript, continue_tokens
from services.common.admission import Admission
from services.common.config import ModelConfig, resolve_model_path
from services.common.errors import ArkError, InvalidRequestError
from services.common.threaded import stream_from_thread

log = logging.getLogger(__name__)

_DEFAULT_SETTINGS: dict[str, Any] = {"n_ctx": 8192, "n_threads": 2, "n_batch": 512}
# Memory for resident sessions' KV caches; each resident session holds one context of n_ctx tokens.
_DEFAULT_SESSION_BUDGET_MB = 800
_LLAMA_SETTINGS = {"n_ctx", "n_threads", "n_batch", "n_threads_batch"}


def _kv_bytes(llama: llama_cpp.Llama) -> int:
    """KV-cache bytes of one context (f16 keys and values for every layer and position)."""
    meta = llama.metadata
    arch = meta.get("general.architecture", "llama")
    layers = int(meta[f"{arch}.block_count"])
    embd = int(meta[f"{arch}.embedding_length"])
    heads = int(meta[f"{arch}.attention.head_count"])
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
    return 2 * layers * llama.n_ctx() * (embd // heads) * kv_heads * 2


def _prefix_length(a: Any, b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class LlamaCppEngine(ChatEngine):
    """One GGUF model in one llama.cpp context."""

    def __init__(self, model: ModelConfig, *, max_queue: int) -> None:
        settings = {**_DEFAULT_SETTINGS, **model.settings}
        budget_mb = float(settings.pop("session_kv_budget_mb", _DEFAULT_SESSION_BUDGET_MB))
        unknown = set(settings) - _LLAMA_SETTINGS
        if unknown:
            raise ArkError(f"models[{model.id}].settings: unknown llama_cpp settings {sorted(unknown)}")
        self.model_id = model.id
        path = resolve_model_path(model.path)
        log.info("loading %s from %s", model.id, path)
        # The weights are memory-mapped once and shared; each further context costs its KV cache and buffers.
        self._llama = ArkLlama(model_path=str(path), verbose=False, **settings)
        self._n_ctx = self._llama.n_ctx()
        slots = max(1, int(budget_mb * 1024 * 1024 // _kv_bytes(self._llama)))
        log.info("%s: %d resident session contexts (%.0f MB KV budget)", model.id, slots, budget_mb)
        self._pool: SessionPool[ArkLlama] = SessionPool(
            [ArkLlama(model_path=str(path), verbose=False, **settings) for _ in range(slots)],
            reset=lambda ctx: ctx.reset(),
        )
        template = self._llama.metadata.get("tokenizer.chat_template")
        if not template:
            raise ArkError(f"model {model.id}: the GGUF file carries no chat template")
        vocab_model = self._llama._model
        eos_id, bos_id = self._llama.token_eos(), self._llama.token_bos()
        eos = vocab_model.token_get_text(eos_id) if eos_id != -1 else ""
        bos = vocab_model.token_get_text(bos_id) if bos_id != -1 else ""
        self._eos_id = eos_id
        self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos, stop_token_ids=[eos_id])
        self._formatter_closed = Jinja2ChatFormatter(
            template=template, eos_token=eos, bos_token=bos, add_generation_prompt=False, stop_token_ids=[eos_id]
        )
        self._is_eog: Callable[[int], bool] = lambda tok: bool(llama_cpp.llama_vocab_is_eog(vocab_model.vocab, tok))
        self._vocab = vocab_model.vocab
        self._n_vocab = self._llama.n_vocab()
        self._checked_grammars: set[str] = set()
        self._admission = Admission(slots=1, max_queue=max_queue)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{model.id}")
        self._cache_owner = ""  # api-key hash whose tokens the context currently holds

    # -- prompt ---------------------------------------------------------------------------------------------------

    def render(self, messages: Sequence[Message], *, open_turn: bool = True) -> str:
        """The messages through the model's chat template, ending with the assistant's turn opened (or not)."""
        formatter = self._formatter if open_turn else self._formatter_closed
        return formatter(messages=[_to_template_message(m) for m in messages]).prompt

    def tokenize(self, text: str, *, add_bos: bool = False) -> list[int]:
        return self._llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def tokenize_prompt(self, messages: Sequence[Message]) -> list[int]:
        """Render the messages with the model's chat template and tokenize them."""
        rendered = self._formatter(messages=[_to_template_message(m) for m in messages])
        return self.tokenize(rendered.prompt, add_bos=not rendered.added_special)

    def _session_prompt(self, resident: Resident, messages: Sequence[Message]) -> tuple[str, list[int]]:
        """The prompt text and tokens, continuing the session's raw tokens when the messages extend its transcript."""
        text = self.render(messages)
        if resident.transcript is not None:
            tokens = continue_tokens(
                resident.transcript,
                messages,
                render_open=self.render,
                render_closed=lambda m: self.render(m, open_turn=False),
                tokenize=self.tokenize,
                eog_token=self._eos_id,
            )
            if tokens is not None:
                return text, tokens
        return text, self.tokenize_prompt(messages)

    # -- generation -----------------------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        t_queued = time.perf_counter()
        self._check_logit_bias(request.sampling.logit_bias)
        constraint = build_constraint(request)
        grammar = self._grammar(constraint)
        messages = _with_tool_instructions(request)
        async with self._admission.slot():
            t_admitted = time.perf_counter()
            resident = None
            if request.session_id:
                self._pool.expire_idle()
                resident = self._pool.checkout(request.session_id, request.api_key_hash, request.idle_timeout)
                llama = resident.context
                prompt_text, tokens = self._session_prompt(resident, messages)
                resident.transcript = None  # until this turn completes
            else:
                llama = self._llama
                prompt_text, tokens = "", self.tokenize_prompt(messages)
                if self._cache_owner != request.api_key_hash:
                    llama.reset()  # no KV reuse across API keys
                    self._cache_owner = request.api_key_hash
            budget = self._token_budget(len(tokens), request.sampling.max_tokens)
            cached = min(_prefix_length(llama._input_ids, tokens), len(tokens) - 1)
            yield Started(prompt_tokens=len(tokens), cached_tokens=cached)

            n = max(1, request.sampling.n)
            completion_tokens = 0
            t_first = 0.0
            for choice in range(n):
                sampling = request.sampling
                if choice and sampling.seed is not None:
                    sampling = replace(sampling, seed=sampling.seed + choice)  # n choices, not n copies
                raw: list[int] = []
                reply: list[str] = []
                parser = (
                    ToolCallParser(expect_call=constraint.tool_call == "required")
                    if constraint and constraint.tool_call
                    else None
                )
                finish = FinishReason.STOP
                async for item in self._stream(llama, tokens, budget, sampling, grammar, raw):
                    if isinstance(item, Finished):
                        finish = item.finish_reason
                        completion_tokens += item.usage.completion_tokens
                        t_first = t_first or item.timings.time_to_first_token_seconds
                        break
                    if parser is not None:
                        text, calls = parser.push(item.text)
                        item = replace(item, text=text, tool_calls=tuple(calls))
                    reply.append(item.text)
                    yield replace(item, choice_index=choice)
                if parser is not None:
                    text, calls = parser.finish()
                    if text or calls:
                        reply.append(text)
                        yield Delta(text, (), tool_calls=tuple(calls), choice_index=choice)
                    if parser.made_call:
                        finish = FinishReason.TOOL_CALLS
                if resident is not None and choice == 0:
                    resident.transcript = Transcript(
                        messages=messages,
                        prompt_text=prompt_text,
                        prompt_tokens=tuple(tokens),
                        generated=tuple(raw),
                        reply="".join(reply),
                        ended_with_eog=bool(raw) and self._is_eog(raw[-1]),
                    )
                t_end = time.perf_counter()
                first = t_first or t_end
                yield Finished(
                    finish,
                    Usage(len(tokens), completion_tokens, cached),
                    Timings(first - t_admitted, t_end - first, t_admitted - t_queued),
                    choice_index=choice,
                    more_choices=choice < n - 1,
                )

    def _stream(
        self,
        llama: ArkLlama,
        tokens: list[int],
        budget: int,
        sampling: Sampling,
        grammar: LlamaGrammar | None,
        raw: list[int],
    ) -> AsyncIterator[GenerationEvent]:
        """One generation on the engine thread, its events handed to the event loop as they happen."""
        return stream_from_thread(
            self._thread,
            lambda post, abort: self._run(llama, tokens, budget, sampling, grammar, abort, post, raw),
            is_last=lambda item: isinstance(item, Finished),
        )

    def _check_logit_bias(self, bias: dict[int, float]) -> None:
        for token in bias:
            if not 0 <= token < self._n_vocab:
                raise InvalidRequestError(
                    f"Invalid value for 'logit_bias': token id {token} is not in the vocabulary "
                    f"(0..{self._n_vocab - 1}).",
                    param="logit_bias",
                )

    def _grammar(self, constraint: Constraint | None) -> LlamaGrammar | None:
        """The compiled grammar, checked once against the vocabulary (llama.cpp rejects what it cannot parse)."""
        if constraint is None:
            return None
        if constraint.gbnf not in self._checked_grammars:
            sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, constraint.gbnf.encode(), b"root")
            if not sampler:
                raise InvalidRequestError(
                    "ARK cannot compile the requested output constraint.",
                    param="response_format",
                    code="invalid_schema",
                )
            llama_cpp.llama_sampler_free(sampler)
            self._checked_grammars.add(constraint.gbnf)
        return LlamaGrammar.from_string(constraint.gbnf, verbose=False)

    def _token_budget(self, prompt_tokens: int, max_tokens: int | None) -> int:
        room = self._n_ctx - prompt_tokens
        if room <= 0:
            raise InvalidRequestError(
                f"This model's maximum context length is {self._n_ctx} tokens. However, your messages resulted in "
                f"{prompt_tokens} tokens. Please reduce the length of the messages.",
                param="messages",
                code="context_length_exceeded",
            )
        if max_tokens is not None and max_tokens > room:
            raise InvalidRequestError(
                f"This model's maximum context length is {self._n_ctx} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
                f"completion). Please reduce the length of the messages or completion.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return room if max_tokens is None else max_tokens

    def _run(
        self,
        llama: ArkLlama,
        tokens: list[int],
        budget: int,
        sampling: Sampling,
        grammar: LlamaGrammar | None,
        abort: threading.Event,
        post: Callable[[GenerationEvent | BaseException], None],
        raw: list[int],
    ) -> None:
        """Generation loop, on the engine thread. `raw` receives every sampled token, end-of-turn included."""
        llama.set_seed(sampling.seed if sampling.seed is not None else random.getrandbits(31))
        llama.logit_bias = dict(sampling.logit_bias)
        want_logprobs = sampling.logprobs
        utf8 = Utf8Stream()
        stops = StopMatcher(sampling.stop)
        finish = FinishReason.LENGTH
        generated = 0
        t_first = 0.0
        for token in llama.generate(
            tokens,
            temp=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k or 0,
            min_p=sampling.min_p or 0.0,
            repeat_penalty=sampling.repetition_penalty or 1.0,
            frequency_penalty=sampling.frequency_penalty,
            presence_penalty=sampling.presence_penalty,
            grammar=grammar,
        ):
            if abort.is_set():
                return
            if not t_first:
                t_first = time.perf_counter()
            raw.append(token)
            if self._is_eog(token):
                finish = FinishReason.STOP
                break
            generated += 1
            piece = llama.detokenize([token])
            logprobs = (self._logprobs(llama, token, piece, sampling.top_logprobs),) if want_logprobs else ()
            text = stops.push(utf8.push(piece))
            if text or not stops.stopped:
                post(Delta(text, (token,), logprobs))
            if stops.stopped:
                finish = FinishReason.STOP
                break
            if generated >= budget:
                break
        tail = stops.push(utf8.flush()) if not stops.stopped else ""
        tail += stops.flush() if not stops.stopped else ""
        if tail:
            post(Delta(tail, ()))
        post(Finished(finish, Usage(len(tokens), generated, 0), Timings(t_first or time.perf_counter(), 0, 0)))

    def _logprobs(self, llama: ArkLlama, token: int, piece: bytes, top: int) -> PositionLogprobs:
        """Log probabilities of the model's distribution at the position just sampled (before sampling knobs)."""
        logits = np.ctypeslib.as_array(llama._ctx.get_logits_ith(-1), shape=(self._n_vocab,))
        shifted = logits - logits.max()
        logz = float(np.log(np.exp(shifted).sum()))

        def entry(tok: int, data: bytes) -> TokenLogprob:
            return TokenLogprob(data.decode("utf-8", errors="replace"), float(shifted[tok]) - logz, data)

        best = np.argpartition(-shifted, top)[:top] if top else []
        ranked = sorted(best, key=lambda t: -shifted[t])
        return PositionLogprobs(entry(token, piece), tuple(entry(int(t), llama.detokenize([int(t)])) for t in ranked))

    # -- sessions and status --------------------------------------------------------------------------------------

    async def drop_session(self, session_id: str) -> bool:
        # Under the admission slot: never reset a context a generation is using.
        async with self._admission.slot(priority=True):
            return self._pool.drop(session_id)

    def expire_idle(self) -> int:
        if self._admission.busy:
            return 0  # the next request expires them
        return len(self._pool.expire_idle())

    def status(self) -> EngineStatus:
        return EngineStatus(
            session_capacity=self._pool.capacity,
            resident_sessions=self._pool.resident,
            queued_requests=self._admission.queued,
        )

    async def close(self) -> None:
        self._thread.shutdown(wait=True)
        self._llama.close()


def _with_tool_instructions(request: GenerationRequest) -> tuple[Message, ...]:
    """The messages, with the tool-calling instructions added to (or as) the system message."""
    if not request.tools or request.tool_choice.mode is ToolChoiceMode.NONE:
        return request.messages
    instructions = tool_instructions(request.tools)
    first = request.messages[0]
    if first.role in (Role.SYSTEM, Role.DEVELOPER):
        return (replace(first, content=f"{first.content}\n\n{instructions}"), *request.messages[1:])
    return (Message(Role.SYSTEM, instructions), *request.messages)


def _to_template_message(message: Message) -> dict[str, Any]:
    content = message.content
    if message.tool_calls and not content:
        # Templates without tool support would drop the call: show the model its own call as it made it.
        calls = [
            {"name": c.function_name, "arguments": json.loads(c.arguments_json or "{}")} for c in message.tool_calls
        ]
        content = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
    out: dict[str, Any] = {"role": str(message.role), "content": content}
    if message.name:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.function_name, "arguments": c.arguments_json}}
            for c in message.tool_calls
        ]
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    return out
