"""Server-sent events, framed once for every stream the edge sends (chat, transcription, responses).

A frame is `event: <type>` (Responses-style streams name each event) and `data: <compact JSON>`, then a blank line;
a keep-alive is an SSE comment, which every client skips, so it never counts as an event (the Responses stream
helpers of OpenAI's SDKs reject unknown event types and gaps in sequence numbers). Chat streams end with
`data: [DONE]`; an error after the response started is sent as one more data frame (OpenAI's envelope) in chat.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"
HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def encode(payload: dict[str, Any] | BaseModel) -> bytes:
    """Compact JSON, as OpenAI sends it (no spaces, non-ASCII unescaped)."""
    if isinstance(payload, BaseModel):
        return payload.model_dump_json(exclude_unset=False).encode()
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def frame(payload: dict[str, Any] | BaseModel, *, event: str | None = None) -> bytes:
    """One SSE frame; with `event`, the frame names its type (as the Responses API streams)."""
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + encode(payload) + b"\n\n"
