"""Tool calls on models without native tool support: the prompt, the call format, and a streaming parser.

The model is told which functions exist and how to call them: one JSON object per call, one call per line,
`{"name": <name>, "arguments": {...}}`. The grammar (services.chat.grammar.lark.tool_calls_grammar) makes that the
only possible output when a call is required, or the alternative to an answer (plain text, or JSON in the
requested format) under `auto`, so names always
exist and arguments always match the function's schema. The parser turns the generated text, as it streams, into
OpenAI's tool-call deltas: for each call, first its index, id, name and empty arguments, then the arguments' JSON in
fragments carrying only the index.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence

from services.chat.domain import Tool, ToolCall, ToolCallDelta
from services.chat.grammar.lark import call_prefix

_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
_STRING_BODY = re.compile(r'(?:[^"\\]|\\.)*')


def _may_open_call(text: str) -> bool:
    """Whether more text could still make `text` (from its `{`) the head of a call, as `_HEAD` reads it.

    Under tool_choice "auto" with a JSON answer format, a JSON answer and a call both start with `{`: the text is
    a call's until it leaves the call's shape (`{"answer": ...` does at its third character).
    """
    rest = text
    for i, part in enumerate(("{", '"name"', ":", '"', None, ",", '"arguments"', ":")):
        if part is None:  # the name, a JSON string's body, then its closing quote
            rest = rest[_STRING_BODY.match(rest).end() :]
            if rest in ("", "\\"):
                return True
            part = '"'
        elif i:
            rest = rest.lstrip()
        if len(rest) <= len(part):
            return part.startswith(rest)
        if not rest.startswith(part):
            return False
        rest = rest[len(part) :]
    return True


def tool_instructions(tools: Sequence[Tool]) -> str:
    """A system-prompt section describing the functions and the calling convention."""
    specs = [
        {"name": t.name, "description": t.description, "parameters": _json_or_empty(t.parameters_json)} for t in tools
    ]
    return (
        "You can call functions. Available functions (JSON):\n"
        + json.dumps(specs, ensure_ascii=False)
        + '\nTo call a function, reply with only a JSON object: {"name": <function name>, "arguments": <object>}.'
    )


def format_calls(calls: Sequence[ToolCall]) -> str:
    """An assistant turn's calls as the model writes them (for rendering earlier turns back into the prompt)."""
    return "\n".join(f"{call_prefix(c.function_name)}{c.arguments_json or '{}'}}}" for c in calls)


def _json_or_empty(text: str) -> object:
    try:
        return json.loads(text or "{}")
    except ValueError:
        return {}


class ToolCallParser:
    """Streams generated text into content, or into one or more tool calls (one per line)."""

    def __init__(self, *, expect_call: bool) -> None:
        self._expect_call = expect_call
        self._mode = "between" if expect_call else "undecided"
        self._buffer = ""  # text not yet assigned (a call's head being read, or leading whitespace)
        self._lead = ""  # whitespace ahead of a possible call's `{` (content if it is no call)
        self._calls = 0
        self._depth = 0
        self._in_string = False
        self._escaped = False

    @property
    def made_call(self) -> bool:
        return self._calls > 0

    def push(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """Feed text; returns (content to show, tool-call deltas)."""
        if self._mode == "text":
            return text, []
        deltas: list[ToolCallDelta] = []
        fragment: list[str] = []
        for i, ch in enumerate(text):
            if self._mode == "undecided":
                self._buffer += ch
                if ch.isspace():
                    continue
                if ch != "{":  # plain text: everything so far and from here on is content
                    self._mode = "text"
                    out, self._buffer = self._buffer + text[i + 1 :], ""
                    return out, deltas
                self._mode, self._lead, self._buffer = "head", self._buffer[:-1], "{"
            elif self._mode == "between":
                if ch == "{":
                    self._mode, self._buffer = "head", "{"
            elif self._mode == "head":
                self._buffer += ch
                if not self._calls and not self._expect_call and not _may_open_call(self._buffer):
                    # A JSON answer, not a call (auto with a JSON answer format): all of it is content.
                    self._mode = "text"
                    out, self._buffer = self._lead + self._buffer + text[i + 1 :], ""
                    return out, deltas
                match = _HEAD.match(self._buffer)
                if match is not None:
                    name = json.loads(f'"{match.group(1)}"')
                    deltas.append(ToolCallDelta(self._calls, f"call_{uuid.uuid4().hex[:24]}", name, ""))
                    self._calls += 1
                    self._mode, self._depth, self._in_string, self._escaped = "args", 0, False, False
                    self._buffer = ""
            elif self._mode == "args":
                self._argument(ch, fragment)
                if self._mode != "args":
                    deltas.append(ToolCallDelta(self._calls - 1, arguments_delta="".join(fragment)))
                    fragment.clear()
            elif self._mode == "close" and ch == "}":
                self._mode = "between"
        if fragment:
            deltas.append(ToolCallDelta(self._calls - 1, arguments_delta="".join(fragment)))
        return "", deltas

    def _argument(self, ch: str, fragment: list[str]) -> None:
        """One character of a call's arguments; the arguments end when their top-level value closes."""
        if self._depth == 0 and ch.isspace():
            return
        fragment.append(ch)
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif ch == "\\":
                self._escaped = True
            elif ch == '"':
                self._in_string = False
        elif ch == '"':
            self._in_string = True
        elif ch in "{[":
            self._depth += 1
        elif ch in "}]":
            self._depth -= 1
            if self._depth == 0:
                self._mode = "close"

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """End of generation: text that never became a call is content; a call cut short keeps what it streamed."""
        if self._mode == "undecided":
            out, self._buffer = self._buffer, ""
            return out, []
        if self._mode == "head" and not self._calls and not self._expect_call:
            out, self._buffer = self._lead + self._buffer, ""  # cut before it was known to be a call: content
            return out, []
        return "", []
