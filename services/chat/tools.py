"""Tool calls on models without native tool support: prompt, grammar, and a streaming parser.

The model is told which functions exist and how to call one: a JSON object `{"name": ..., "arguments": {...}}`.
When a call is required (or one function is named) a grammar makes that object the only possible output, so the
arguments always parse and match the function's schema; with `auto` the grammar allows either plain text or such
an object. The parser turns the generated text, as it streams, into OpenAI's tool-call deltas: the name first,
then the arguments' JSON in fragments.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from services.chat.domain import Tool, ToolCallDelta

_HEAD = re.compile(r'^\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def tool_instructions(tools: tuple[Tool, ...]) -> str:
    """A system-prompt section describing the functions and the calling convention."""
    specs = [
        {"name": t.name, "description": t.description, "parameters": json.loads(t.parameters_json or "{}")}
        for t in tools
    ]
    return (
        "You can call functions. Available functions (JSON):\n"
        + json.dumps(specs, ensure_ascii=False)
        + '\nTo call a function, reply with only a JSON object: {"name": <function name>, "arguments": <object>}.'
    )


def call_schema(tools: tuple[Tool, ...]) -> dict:
    """JSON Schema of one call to any of `tools`."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": json.loads(t.parameters_json or "{}") or {}},
            "required": ["name", "arguments"],
        }
        for t in tools
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


@dataclass
class _Call:
    id: str
    name: str


class ToolCallParser:
    """Streams generated text into either content or one tool call."""

    def __init__(self, *, expect_call: bool) -> None:
        self._buffer = ""
        self._mode = "call" if expect_call else "undecided"
        self._call: _Call | None = None
        self._held = ""  # trailing '}' and spaces that may be the wrapper's closing brace
        self._emitted = False

    @property
    def made_call(self) -> bool:
        return self._call is not None

    def push(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """Feed text; returns (content to show, tool-call deltas)."""
        if self._mode == "text":
            return text, []
        self._buffer += text
        if self._mode == "undecided":
            stripped = self._buffer.lstrip()
            if not stripped:
                return "", []
            if not stripped.startswith("{"):
                self._mode = "text"
                out, self._buffer = self._buffer, ""
                return out, []
            self._mode = "call"
        deltas: list[ToolCallDelta] = []
        if self._call is None:
            match = _HEAD.match(self._buffer)
            if match is None:
                return "", []
            self._call = _Call(f"call_{uuid.uuid4().hex[:24]}", json.loads(f'"{match.group(1)}"'))
            deltas.append(ToolCallDelta(0, self._call.id, self._call.name, ""))
            self._buffer = self._buffer[match.end() :]
        pending = self._held + self._buffer
        if not self._emitted:
            pending = pending.lstrip()
        self._buffer = ""
        keep = len(pending) - len(pending.rstrip("} \n\t"))
        emit, self._held = pending[: len(pending) - keep], pending[len(pending) - keep :]
        if emit:
            self._emitted = True
            deltas.append(ToolCallDelta(0, arguments_delta=emit))
        return "", deltas

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """End of generation: drop the wrapper's closing brace; text that never became a call is content."""
        if self._call is None:
            out, self._buffer = self._buffer, ""
            return out, []
        closing = self._held.rstrip()
        tail = (closing[:-1] if closing.endswith("}") else closing).rstrip()
        self._held = ""
        return "", [ToolCallDelta(0, arguments_delta=tail)] if tail else []
