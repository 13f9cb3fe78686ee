"""The grammars ARK constrains outputs with, written in llguidance's Lark dialect.

One text form for every engine: llama.cpp applies it through an llguidance matcher; TensorRT-LLM takes the same
text as `GuidedDecodingParams(grammar=...)` with its `llguidance` backend. JSON schemas are embedded as `%json`
blocks, each its own document: a call's (its name and arguments) or an answer's.

JSON is generated with fixed separators (`", "` and `": "`) and no other whitespace: a small model cannot wander
into endless indentation, and clients parse it as usual.
"""

from __future__ import annotations

import json
from typing import Any

# llguidance's JSON options (see its JSON Schema documentation), set on every embedded schema.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Plain text under tool_choice "auto": anything that does not start like a call (or with whitespace).
_TEXT = r"TEXT: /[^{\s](?s:.*)/"
# Text under tool_choice "none": anything but the opening of a call (llguidance's lexeme `&` and `~`).
_NO_CALL = r'NO_CALL: /(?s:.*)/ & ~/\s*\{\s*"name"(?s:.*)/'


def _json_block(schema: Any) -> str:
    body = schema if isinstance(schema, dict) else ({} if schema is True else {"not": {}})
    return "%json " + json.dumps({**body, "x-guidance": _JSON_OPTIONS}, ensure_ascii=False)


def json_schema_grammar(schema: Any) -> str:
    """Output is exactly one JSON value valid against `schema`."""
    return f"start: {_json_block(schema)}\n"


def call_prefix(name: str) -> str:
    """The text a call to `name` starts with; the arguments object follows, then `}`."""
    return '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '


def _rebased(schema: Any) -> Any:
    """`schema` (a function's parameters) moved under a call's `properties.arguments`: its local `$ref`s follow it
    (its `$defs` and `definitions` are lifted to the call's root, so references into them stay as written)."""
    if isinstance(schema, list):
        return [_rebased(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _rebased(v) for k, v in schema.items()}
    ref = out.get("$ref")
    local = isinstance(ref, str) and (ref == "#" or ref.startswith("#/"))
    if local and not ref.startswith(("#/$defs/", "#/definitions/")):
        out["$ref"] = "#/properties/arguments" + ref[1:]
    return out


def _call_schema(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """A call of `name` as one JSON object, `{"name": <name>, "arguments": <parameters>}` in that order.

    A call is written in JSON Schema, like an answer, rather than as a literal head before its arguments: the
    constraint engine's lexer does not backtrack, so a literal `{"name": ...` beside a JSON answer's `{` would
    refuse every answer.
    """
    arguments = _rebased({k: v for k, v in parameters.items() if k not in ("$defs", "definitions")})
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": arguments},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }
    for key in ("$defs", "definitions"):
        if key in parameters:
            schema[key] = _rebased(parameters[key])
    return schema


def json_answer(schema: Any) -> str:
    """The Lark expression of an answer that is one JSON value valid against `schema` (beside tool calls)."""
    return _json_block(schema)


# The Lark expression of a plain-text answer beside tool calls.
TEXT_ANSWER = "TEXT"


def tool_calls_grammar(tools: list[tuple[str, dict[str, Any]]], *, max_calls: int, answer: str | None) -> str:
    """One to `max_calls` calls, one per line, each `{"name": <name>, "arguments": <object>}`, or else `answer`.

    `tools` holds each function's name and the JSON Schema of its arguments. `answer` (tool_choice "auto") is what
    the output may be instead of calls: `TEXT_ANSWER`, or `json_answer(schema)` when the request also asks for
    structured output (OpenAI applies both: the model calls a tool or answers in the schema); None: calls only.
    """
    lines = []
    names = []
    for i, (name, parameters) in enumerate(tools):
        names.append(f"call_{i}")
        lines.append(f"call_{i}: {_json_block(_call_schema(name, parameters))}")
    more = f' ("\\n" call){{0,{max_calls - 1}}}' if max_calls > 1 else ""
    if answer is None:
        head = ["start: calls"]
    else:
        head = ["start: calls | answer", f"answer: {answer}", *([_TEXT] if answer == TEXT_ANSWER else [])]
    return "\n".join([*head, f"calls: call{more}", "call: " + " | ".join(names), *lines]) + "\n"


def no_call_grammar() -> str:
    """Any text that does not open a call: tool_choice "none" while the tools stay in the prompt."""
    return f"start: NO_CALL\n{_NO_CALL}\n"
