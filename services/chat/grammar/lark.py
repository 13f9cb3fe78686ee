"""The grammars ARK constrains outputs with, written in llguidance's Lark dialect.

One text form for every engine: llama.cpp applies it through an llguidance matcher; TensorRT-LLM takes the same
text as `GuidedDecodingParams(grammar=...)` with its `llguidance` backend. JSON schemas are embedded as `%json`
blocks, each its own document, so a tool's local `$ref`s resolve within its own parameters.

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


def _json_block(schema: Any) -> str:
    body = schema if isinstance(schema, dict) else ({} if schema is True else {"not": {}})
    return "%json " + json.dumps({**body, "x-guidance": _JSON_OPTIONS}, ensure_ascii=False)


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def json_schema_grammar(schema: Any) -> str:
    """Output is exactly one JSON value valid against `schema`."""
    return f"start: {_json_block(schema)}\n"


def json_object_grammar() -> str:
    """Output is one JSON object (OpenAI's JSON mode)."""
    return json_schema_grammar({"type": "object"})


def call_prefix(name: str) -> str:
    """The text a call to `name` starts with; the arguments object follows, then `}`."""
    return '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '


def tool_calls_grammar(tools: list[tuple[str, dict[str, Any]]], *, max_calls: int, allow_text: bool) -> str:
    """One to `max_calls` calls, one per line, each `{"name": <name>, "arguments": <object>}`.

    `tools` holds each function's name and the JSON Schema of its arguments. With `allow_text` (tool_choice
    "auto") the output is either such calls or plain text.
    """
    lines = []
    names = []
    for i, (name, parameters) in enumerate(tools):
        names.append(f"call_{i}")
        lines.append(f"call_{i}: {_literal(call_prefix(name))} args_{i} " + _literal("}"))
        lines.append(f"args_{i}: {_json_block(parameters)}")
    more = f' ("\\n" call){{0,{max_calls - 1}}}' if max_calls > 1 else ""
    head = ["start: calls | TEXT", _TEXT] if allow_text else ["start: calls"]
    return "\n".join([*head, f"calls: call{more}", "call: " + " | ".join(names), *lines]) + "\n"
