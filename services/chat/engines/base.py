"""The narrow interface every chat engine implements (llama.cpp on CPU, TensorRT-LLM on GPU).

An engine is a thin adapter to one library: it renders and tokenizes with the model's own template, streams the
tokens it samples for a prompt of token ids, reports how much of the prompt it reused, and keeps per-context state.
Everything that is not library-specific — admission, sessions and transcripts, tools, `n` choices, stop strings,
the context budget, the order of errors — lives once in `services.chat.generator.Generator`, above every engine, so
each engine gets it and the layer can be tested against a fake engine.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from services.chat.domain import GenerationRequest, Sampling


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token: int
    piece: bytes
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenSample:
    """One token sampled for sequence `index` (end-of-generation tokens included: they belong to the transcript)."""

    index: int
    token: int
    piece: bytes  # the token's bytes; may end inside a UTF-8 character
    logprob: float | None = None  # of the sampled token, when the run asked for logprobs
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class PromptReuse:
    """First event of a run: how many prompt tokens were reused from cached state instead of computed."""

    cached_tokens: int


class EndReason(StrEnum):
    """Why a sequence gets no more tokens; the generation layer reports `length` as such and the rest as `stop`."""

    EOG = "eog"  # end-of-generation sampled
    LENGTH = "length"  # the token budget is spent
    STOPPED = "stopped"  # the layer asked it to stop (a stop string, a finished tool call)
    GRAMMAR = "grammar"  # the output constraint is complete: nothing but end-of-generation could follow


@dataclass(frozen=True, slots=True)
class SequenceEnd:
    """Sequence `index` will get no more tokens, for `reason`."""

    index: int
    reason: EndReason


EngineEvent = PromptReuse | TokenSample | SequenceEnd


@dataclass(slots=True)
class EngineRun:
    """One generation as the engine sees it: token ids in, `n` sequences of sampled tokens out."""

    prompt: Sequence[int]
    sampling: Sampling
    max_new_tokens: int  # per sequence
    n: int = 1
    constraint: Any = None  # services.chat.constraints.Constraint: the output grammar, or None
    context: Any = None  # from `new_context()`: a session's resident state; None: the engine's scratch state
    cache_salt: str = ""  # state is never reused across different salts (one per API key)
    retention_seconds: float = 0.0  # keep this prompt's and reply's cached state at least this long (sessions)
    stopped: set[int] = field(default_factory=set)  # sequences the layer has ended (stop string, finished call)
    abort: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True, slots=True)
class EngineStatus:
    session_capacity: int
    resident_sessions: int
    queued_requests: int


class ChatEngine(ABC):
    """Tokens for token ids, for one model."""

    model_id: str
    context_window: int  # prompt + completion tokens
    vocab_size: int
    eog_token: int  # the token that closes an assistant turn in this model's template
    max_concurrency: int = 1  # generations the engine runs at once
    context_slots: int = 0  # resident session contexts the engine can hold
    # GGUF file whose vocabulary output constraints compile against, for engines that sample through ARK's token
    # matchers; None: the engine applies `Constraint.grammar` itself (TensorRT-LLM's guided decoding).
    grammar_vocabulary: str | None = None

    # -- prompt ---------------------------------------------------------------------------------------------------

    @abstractmethod
    def render(self, messages: Sequence[dict[str, Any]], *, open_turn: bool = True) -> str:
        """The messages (template dictionaries) through the model's template, the assistant's turn opened or not."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of a piece of rendered text (special tokens parsed, no beginning-of-sequence token added)."""

    @abstractmethod
    def encode_prompt(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Render with the assistant's turn opened and tokenize, with the beginning-of-sequence token if needed."""

    @abstractmethod
    def is_eog(self, token: int) -> bool:
        """Whether sampling `token` ends the generation (end of turn or of text)."""

    def validate(self, request: GenerationRequest) -> None:  # noqa: B027 - optional hook
        """Refuse, before any work, what this engine cannot honour (raise InvalidRequestError and friends)."""

    # -- generation -----------------------------------------------------------------------------------------------

    @abstractmethod
    def run(self, job: EngineRun) -> AsyncIterator[EngineEvent]:
        """`PromptReuse` first, then each sequence's `TokenSample`s and its `SequenceEnd`.

        Sequences may interleave. Closing the iterator (or setting `job.abort`) stops the computation within one
        token; a sequence listed in `job.stopped` gets no more tokens.
        """

    # -- per-context state ----------------------------------------------------------------------------------------

    def new_context(self) -> Any:
        """A context that keeps one conversation's state between runs."""
        return None

    def reset_context(self, context: Any) -> None:  # noqa: B027 - optional hook
        """Forget a context's state (it is about to hold another conversation)."""

    def context_tokens(self, context: Any) -> Sequence[int]:
        """The token ids whose state `context` currently holds."""
        return ()

    def export_state(self, context: Any) -> bytes | bytearray | None:
        """The context's state as bytes (to keep it outside the context), or None if the engine cannot."""
        return None

    def import_state(self, context: Any, data: bytes | bytearray, tokens: Sequence[int]) -> bool:
        """Load state produced by `export_state` for `tokens` into `context`; False if it cannot be used."""
        return False

    def on_memory_full(self, spill: Callable[[], bool]) -> None:  # noqa: B027 - optional hook
        """Who frees memory held by idle contexts when the engine runs out of it (the conversation store, once).

        The engine calls `spill()` on its own thread, where `export_state` and `reset_context` must then run at
        once; each call saves one idle context's state and clears it, and returns False when none is left. Engines
        that manage their own memory (TensorRT-LLM's block cache) never call it."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release engine resources."""
