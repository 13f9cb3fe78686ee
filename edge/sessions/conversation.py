"""Which conversation a chat request continues, as a key the registry places by (the session contract, item 3).

A conversation is named within its API key (never across keys: the registry keys placements by the key hash too):

- `"k:" + sha256(prompt_cache_key)` when the client names it with OpenAI's `prompt_cache_key`;
- otherwise `"m:" + sha256(opening messages)`: every leading system/developer message plus the first user message,
  as canonical JSON. Later turns resend that opening unchanged, so every turn of a conversation maps to the same key
  with or without a cookie (curl, the Node SDK and apps that strip cookies included), while two users of one app who
  share a system prompt differ by their first message.

The key only chooses a worker; what is reused is decided there, by matching tokens.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from edge.chat.schemas import ChatMessageIn

_PREAMBLE_ROLES = frozenset({"system", "developer"})


def opening_messages(messages: Sequence[ChatMessageIn]) -> list[ChatMessageIn]:
    """The leading system/developer messages and the first user message (all messages if there is none)."""
    opening: list[ChatMessageIn] = []
    for message in messages:
        opening.append(message)
        if message.role not in _PREAMBLE_ROLES:
            break
    return opening


def _canonical(messages: Sequence[ChatMessageIn]) -> bytes:
    # Only what identifies the content: role, name and content (a part list or a string), in a fixed key order.
    # Response-only keys a client may echo back (refusal, annotations) do not change the conversation.
    payload = [{"role": m.role, "name": m.name, "content": m.model_dump(mode="json")["content"]} for m in messages]
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def conversation_key(messages: Sequence[ChatMessageIn], prompt_cache_key: str | None = None) -> str:
    """The placement key of the conversation a request continues."""
    if prompt_cache_key:
        return "k:" + hashlib.sha256(prompt_cache_key.encode()).hexdigest()
    return "m:" + hashlib.sha256(_canonical(opening_messages(messages))).hexdigest()
