"""A session's token-level transcript, and continuing a conversation from the worker's own raw tokens.

After each turn the worker remembers the request's messages, the prompt tokens, and the raw tokens it sampled
(including any the client never saw: text cut by a stop sequence, hidden reasoning). When the next request
carries that turn back — the same messages plus an assistant message with exactly the visible reply — the new
prompt is the old prompt + the raw tokens + the tokenized rest, rather than a re-rendering: the KV state already
holds those raw tokens, so only the new messages are computed. Anything else (an edited history) falls back to
a full rendering, and the engine still reuses the KV state up to the first differing token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from services.chat.domain import Message, Role


def shared_prefix(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray) -> int:
    """How many tokens two token sequences share from the start: the one measure every state match uses (the
    engine's sequences, resident conversations, saved states)."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


@dataclass(frozen=True, slots=True)
class Transcript:
    messages: tuple[Message, ...]
    prompt_text: str  # rendered with the generation prompt: exactly what prompt_tokens encode
    prompt_tokens: tuple[int, ...]
    generated: tuple[int, ...]  # raw sampled tokens, including the end-of-turn token when one was sampled
    reply: str  # the text the client was given
    ended_with_eog: bool


def continue_tokens(
    transcript: Transcript,
    messages: Sequence[Message],
    *,
    render_open: Callable[[Sequence[Message]], str],
    render_closed: Callable[[Sequence[Message]], str],
    tokenize: Callable[[str], list[int]],
    eog_token: int,
) -> list[int] | None:
    """The prompt tokens continuing `transcript`, or None when `messages` do not continue it."""
    n = len(transcript.messages)
    if len(messages) <= n + 1 or tuple(messages[:n]) != transcript.messages:
        return None
    answer = messages[n]
    if answer.role is not Role.ASSISTANT or answer.content != transcript.reply or answer.tool_calls:
        return None
    closed = render_closed(messages[: n + 1])
    head = transcript.prompt_text + transcript.reply
    if not closed.startswith(head):
        return None  # the template renders assistant turns in a way we cannot splice
    full = render_open(messages)
    if not full.startswith(closed):
        return None
    closing = tokenize(closed[len(head) :])
    if transcript.ended_with_eog and closing[:1] == [eog_token]:
        closing = closing[1:]  # the end-of-turn token is already among the raw tokens
    return [*transcript.prompt_tokens, *transcript.generated, *closing, *tokenize(full[len(closed) :])]
