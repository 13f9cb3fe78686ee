"""The generation layer: everything about a chat completion that does not depend on the engine library.

    servicer (proto ⇄ domain)
        │ GenerationRequest                       ▲ Started, Delta…, Finished
        ▼                                         │
    Generator ── checks (logit bias, constraint, engine limits, context budget) ── all before Started
        │        admission (bounded FIFO) · session contexts and token-level transcripts · tool instructions
        │        per choice: UTF-8 assembly, stop strings, tool-call parsing, finish reasons, usage, timings
        │ EngineRun(prompt token ids, sampling, n, constraint, context, cache salt, retention)
        ▼                                         ▲ PromptReuse, TokenSample…, SequenceEnd
    ChatEngine (llama.cpp │ TensorRT-LLM): render/tokenize, sample tokens, keep per-context state

So every engine gets sessions, tools, `n`, logprobs and the same error order, and this layer is tested against a
fake engine without a model.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

from services.chat.constraints import ConstraintCompiler
from services.chat.domain import (
    Admitted,
    Delta,
    Finished,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    PositionLogprobs,
    Started,
    Timings,
    TokenLogprob,
    Usage,
)
from services.chat.engines.base import (
    ChatEngine,
    EndReason,
    EngineRun,
    EngineStatus,
    PromptReuse,
    SequenceEnd,
    TokenSample,
)
from services.chat.prompts import Prompts
from services.chat.state_store import Checkout, ConversationStore
from services.chat.templates import with_tool_instructions
from services.chat.text import StopMatcher, Utf8Stream
from services.chat.tools import ToolCallParser
from services.chat.transcript import Transcript
from services.common.admission import Admission
from services.common.config import SessionsConfig, StructuredOutputLimits
from services.common.errors import InternalError, InvalidRequestError


@dataclass(slots=True)
class _Choice:
    """One choice's progress from sampled tokens to what the client sees."""

    index: int
    stops: StopMatcher
    parser: ToolCallParser | None
    utf8: Utf8Stream = field(default_factory=Utf8Stream)
    raw: list[int] = field(default_factory=list)  # every sampled token, end-of-generation included
    reply: list[str] = field(default_factory=list)
    generated: int = 0
    done: bool = False


class Generator:
    """Chat completions for one model, on one engine."""

    def __init__(
        self,
        engine: ChatEngine,
        *,
        max_queue: int,
        max_queue_wait: float | None = None,
        sessions: SessionsConfig | None = None,
        constraint_limits: StructuredOutputLimits | None = None,
    ) -> None:
        self.engine = engine
        self.model_id = engine.model_id
        # Output constraints (JSON, schemas, tools): checked, compiled in a bounded child process, cached.
        self._constraints = ConstraintCompiler(
            constraint_limits or StructuredOutputLimits(), gguf_path=engine.grammar_vocabulary
        )
        # Refused for load (429) on arrival when the queue is full or the expected wait exceeds `max_queue_wait`.
        self._admission = Admission(
            slots=max(1, engine.max_concurrency),
            max_queue=max_queue,
            max_wait_seconds=max_queue_wait,
            name=engine.model_id,
        )
        self._prompts = Prompts(engine)
        # Conversation states: a few resident in the engine's contexts, the rest saved in the host and disk tiers
        # (sized by `sessions`; None: no tiers).
        self.store = ConversationStore.from_config(engine, self._prompts, sessions)

    @property
    def admission(self) -> Admission:
        """The queue for this model's engine slots (closed by the server when the worker stops)."""
        return self._admission

    # -- checks, all before Started --------------------------------------------------------------------------------

    def _check(self, request: GenerationRequest) -> None:
        vocab = self.engine.vocab_size
        for token in request.sampling.logit_bias:
            if not 0 <= token < vocab:
                raise InvalidRequestError(
                    f"Invalid value for 'logit_bias': token id {token} is not in the vocabulary (0..{vocab - 1}).",
                    param="logit_bias",
                )
        self.engine.validate(request)

    def _token_budget(self, prompt_tokens: int, max_tokens: int | None) -> int:
        window = self.engine.context_window
        room = window - prompt_tokens
        if room <= 0:
            raise InvalidRequestError(
                f"This model's maximum context length is {window} tokens. However, your messages resulted in "
                f"{prompt_tokens} tokens. Please reduce the length of the messages.",
                param="messages",
                code="context_length_exceeded",
            )
        if max_tokens is not None and max_tokens > room:
            raise InvalidRequestError(
                f"This model's maximum context length is {window} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
                f"completion). Please reduce the length of the messages or completion.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return room if max_tokens is None else max_tokens

    # -- generation ------------------------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Stream `Admitted`, `Started`, then `Delta`s, then one `Finished` per choice (the last with `more_choices`
        False).

        Bad input raises before `Started`; closing the iterator aborts the engine's work within one token.
        """
        t_queued = time.perf_counter()
        self._check(request)
        constraint = await self._constraints.build(request)
        messages = with_tool_instructions(request)
        n = max(1, request.sampling.n)
        async with AsyncExitStack() as admitted:
            # Held while the engine works for this request, and not while a slow client reads the last event.
            await admitted.enter_async_context(self._admission.slot())
            t_admitted = time.perf_counter()
            # Before any risky work (rendering, tokenising, compiling the constraint): see Admitted.
            yield Admitted(queue_seconds=t_admitted - t_queued)
            resident: Checkout | None = None
            tier = ""
            if request.session_id:
                resident = await self.store.checkout(
                    api_key_hash=request.api_key_hash,
                    session_id=request.session_id,
                    conversation_key=request.conversation_key,
                    idle_timeout=request.idle_timeout,
                    messages=messages,
                )
                prompt_text, tokens, tier = resident.prompt_text, resident.tokens, resident.tier
            else:
                prompt_text, tokens = "", self._prompts.encode(messages)
            try:
                budget = self._token_budget(len(tokens), request.sampling.max_tokens)
            except InvalidRequestError:
                if resident is not None:
                    self.store.release(resident)
                raise
            job = EngineRun(
                prompt=tokens,
                sampling=request.sampling,
                max_new_tokens=budget,
                n=n,
                constraint=constraint,
                context=resident.context if resident is not None else None,
                cache_salt=request.api_key_hash,
                retention_seconds=request.idle_timeout if resident is not None else 0.0,
            )
            tool_mode = constraint.tool_call if constraint is not None else ""
            choices = [
                _Choice(
                    i,
                    StopMatcher(request.sampling.stop),
                    ToolCallParser(expect_call=tool_mode == "required") if tool_mode else None,
                )
                for i in range(n)
            ]
            events = self.engine.run(job)
            try:
                first = await anext(events, None)
                if not isinstance(first, PromptReuse):
                    raise InternalError("The chat engine did not report its prompt.")
                cached = min(first.cached_tokens, len(tokens))
                yield Started(prompt_tokens=len(tokens), cached_tokens=cached, state_tier=tier if cached else "")
                completion_tokens = 0
                open_choices = n
                t_first = 0.0
                async for event in events:
                    if isinstance(event, TokenSample):
                        choice = choices[event.index]
                        if choice.done:
                            continue  # sampled before the engine saw the stop
                        t_first = t_first or time.perf_counter()
                        choice.raw.append(event.token)
                        if self.engine.is_eog(event.token):
                            continue  # the SequenceEnd that follows closes the choice
                        choice.generated += 1
                        completion_tokens += 1
                        delta = self._delta(choice, event)
                        if delta is not None:
                            yield delta
                        if choice.stops.stopped:
                            job.stopped.add(choice.index)
                            finish = FinishReason.STOP
                        elif choice.generated >= budget:
                            finish = FinishReason.LENGTH
                        else:
                            continue
                    elif isinstance(event, SequenceEnd):
                        choice = choices[event.index]
                        if choice.done:
                            continue
                        finish = FinishReason.LENGTH if event.reason == EndReason.LENGTH else FinishReason.STOP
                    else:
                        continue
                    for tail in self._close(choice):
                        yield tail
                    if choice.parser is not None and choice.parser.made_call and finish is not FinishReason.LENGTH:
                        finish = FinishReason.TOOL_CALLS
                    open_choices -= 1
                    if choice.index == 0 and resident is not None:
                        self.store.complete(
                            resident,
                            Transcript(
                                messages=messages,
                                prompt_text=prompt_text,
                                prompt_tokens=tuple(tokens),
                                generated=tuple(choice.raw),
                                reply="".join(choice.reply),
                                ended_with_eog=bool(choice.raw) and self.engine.is_eog(choice.raw[-1]),
                            ),
                        )
                    t_end = time.perf_counter()
                    first_at = t_first or t_end
                    if not open_choices:
                        # Before the last event: the client's next turn may arrive as soon as it has it, and must
                        # find this turn's context free; the admission slot goes back too.
                        await self._let_go(job, events, resident)
                        await admitted.aclose()
                    yield Finished(
                        finish,
                        Usage(len(tokens), completion_tokens, cached),
                        Timings(first_at - t_admitted, t_end - first_at, t_admitted - t_queued),
                        choice_index=choice.index,
                        more_choices=open_choices > 0,
                    )
                    if not open_choices:
                        break
                if open_choices:
                    raise InternalError("The chat engine ended the generation early.")
            finally:
                await self._let_go(job, events, resident)

    async def _let_go(self, job: EngineRun, events: AsyncGenerator, resident: Checkout | None) -> None:
        """End the engine's work on the run (at once if it is still sampling) and free its context; idempotent."""
        job.abort.set()
        await events.aclose()
        if resident is not None:
            self.store.release(resident)

    def _delta(self, choice: _Choice, sample: TokenSample) -> Delta | None:
        text = choice.stops.push(choice.utf8.push(sample.piece))
        logprobs = ()
        if sample.logprob is not None:
            logprobs = (
                PositionLogprobs(
                    _entry(sample.piece, sample.logprob), tuple(_entry(t.piece, t.logprob) for t in sample.top)
                ),
            )
        if not text and choice.stops.stopped:
            return None
        calls = ()
        if choice.parser is not None:
            text, found = choice.parser.push(text)
            calls = tuple(found)
        choice.reply.append(text)
        return Delta(text, (sample.token,), logprobs, tool_calls=calls, choice_index=choice.index)

    def _close(self, choice: _Choice) -> list[Delta]:
        """Flush what the choice held back (a partial character, a possible stop, a call's closing brace)."""
        choice.done = True
        tail = ""
        if not choice.stops.stopped:
            tail = choice.stops.push(choice.utf8.flush())
            tail += choice.stops.flush() if not choice.stops.stopped else ""
        out: list[Delta] = []
        calls: list = []
        if choice.parser is not None:
            text, calls = choice.parser.push(tail) if tail else ("", [])
            more_text, more_calls = choice.parser.finish()
            tail, calls = text + more_text, [*calls, *more_calls]
        if tail or calls:
            choice.reply.append(tail)
            out.append(Delta(tail, (), tool_calls=tuple(calls), choice_index=choice.index))
        return out

    # -- sessions and status ---------------------------------------------------------------------------------------

    async def drop_session(self, session_id: str) -> bool:
        """Free every state of a session, in every tier; True if there was any."""
        # Under the admission slot: housekeeping goes first but waits its turn with the running generations.
        async with self._admission.slot(priority=True):
            return bool(await asyncio.to_thread(self.store.drop_session, session_id))

    async def expire_idle(self) -> int:
        """Drop states idle past their timeout; returns how many were dropped."""
        if self._admission.busy:
            return 0  # the next request expires them
        async with self._admission.slot(priority=True):
            return await asyncio.to_thread(self.store.expire_idle)

    def status(self) -> EngineStatus:
        return EngineStatus(
            session_capacity=self.store.capacity,
            resident_sessions=self.store.resident,
            queued_requests=self._admission.queued,
        )

    async def close(self) -> None:
        self._constraints.close()
        self.store.close()
        await self.engine.close()


def _entry(piece: bytes, logprob: float) -> TokenLogprob:
    return TokenLogprob(piece.decode("utf-8", errors="replace"), logprob, piece)
