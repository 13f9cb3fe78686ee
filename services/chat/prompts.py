"""A request's prompt tokens with the engine's own template: rendered afresh, or continuing a kept transcript from
the worker's raw tokens (services/chat/transcript.py). The generation layer and the conversation store share one."""

from __future__ import annotations

from collections.abc import Sequence

from services.chat.domain import Message
from services.chat.engines.base import ChatEngine
from services.chat.templates import template_message
from services.chat.transcript import Transcript, continue_tokens


class Prompts:
    """Prompts of one model."""

    def __init__(self, engine: ChatEngine) -> None:
        self._engine = engine

    def render(self, messages: Sequence[Message], *, open_turn: bool = True) -> str:
        return self._engine.render([template_message(m) for m in messages], open_turn=open_turn)

    def encode(self, messages: Sequence[Message]) -> list[int]:
        """The prompt rendered afresh, with the beginning-of-sequence token if the model needs one."""
        return self._engine.encode_prompt([template_message(m) for m in messages])

    def continue_from(self, transcript: Transcript, messages: Sequence[Message]) -> list[int] | None:
        """The prompt continuing a transcript from the worker's own raw tokens, or None if `messages` diverge."""
        n = len(transcript.messages)
        if len(messages) <= n + 1 or tuple(messages[:n]) != transcript.messages:
            return None  # cheap check first: most states are other conversations
        return continue_tokens(
            transcript,
            messages,
            render_open=self.render,
            render_closed=lambda m: self.render(m, open_turn=False),
            tokenize=self._engine.tokenize,
            eog_token=self._engine.eog_token,
        )
