"""Items of the Responses API: normalising what a client sends, the ids ARK gives them, and turning a history of
items into the chat messages the worker renders (pure; unit-tested).

Item ids carry the id of the object that created them (`msg_<hex of resp_… or conv_…><suffix>`), so an
`item_reference` (what the Vercel AI SDK sends for earlier assistant turns) is resolved with one lookup of that
object, with no index of items to keep.
"""

from __future__ import annotations

import json
from typing import Any

from ark.chat.v1 import chat_service_pb2 as pb
from services.common.errors import InvalidRequestError, UnsupportedParameterError

ROLES = {
    "system": pb.ROLE_SYSTEM,
    "developer": pb.ROLE_DEVELOPER,
    "user": pb.ROLE_USER,
    "assistant": pb.ROLE_ASSISTANT,
}
_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}
HEX_LENGTH = 32


def item_id(kind: str, owner_id: str, suffix: str) -> str:
    """An item id naming its owner: `<prefix>_<owner hex><suffix>`."""
    return f"{_PREFIX[kind]}_{owner_id.partition('_')[2]}{suffix}"


def owner_hex(reference: str) -> str | None:
    """The hex id of the object that created an item, from the item's id (None for an id ARK did not give)."""
    hex_part = reference.partition("_")[2][:HEX_LENGTH]
    if len(hex_part) != HEX_LENGTH or any(c not in "0123456789abcdef" for c in hex_part):
        return None
    return hex_part


def _text_parts(content: Any, param: str, *, output: bool) -> list[dict[str, Any]]:
    if isinstance(content, str):
        parts = [{"type": "output_text" if output else "input_text", "text": content}]
    elif isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("input_text", "output_text", "text", "refusal") or not isinstance(
                part.get("text", part.get("refusal")), str
            ):
                raise UnsupportedParameterError(
                    f"Content parts of type {kind!r} are not supported: the served models read text only.",
                    param=f"{param}.content[{j}]",
                )
            text = part.get("text", part.get("refusal"))
            parts.append({"type": "output_text" if output else "input_text", "text": text})
    else:
        raise InvalidRequestError(f"Missing required parameter: '{param}.content'.", param=f"{param}.content")
    if output:
        parts = [{**p, "annotations": [], "logprobs": []} for p in parts]
    return parts


def normalize(raw: Any, index: int, param: str, owner_id: str) -> dict[str, Any]:
    """One input item in its stored form (with an id and a status); `item_reference` stays a reference."""
    where = f"{param}[{index}]"
    if not isinstance(raw, dict):
        raise InvalidRequestError(f"Invalid value for '{where}': an item must be an object.", param=where)
    kind = raw.get("type") or ("message" if "role" in raw else ("item_reference" if "id" in raw else None))
    given_id = raw.get("id") if isinstance(raw.get("id"), str) else None
    if kind == "item_reference":
        if not given_id:
            raise InvalidRequestError(f"Missing required parameter: '{where}.id'.", param=f"{where}.id")
        return {"type": "item_reference", "id": given_id}
    if kind == "message":
        role = raw.get("role")
        if role not in ROLES:
            raise InvalidRequestError(
                f"Invalid value for '{where}.role': {role!r} (expected user, assistant, system or developer).",
                param=f"{where}.role",
            )
        output = role == "assistant"
        return {
            "id": given_id or item_id("message", owner_id, f"i{index}"),
            "type": "message",
            "role": role,
            "status": "completed",
            "content": _text_parts(raw.get("content"), where, output=output),
        }
    if kind == "function_call":
        for field in ("call_id", "name", "arguments"):
            if not isinstance(raw.get(field), str):
                raise InvalidRequestError(f"Missing required parameter: '{where}.{field}'.", param=f"{where}.{field}")
        return {
            "id": given_id or item_id("function_call", owner_id, f"i{index}"),
            "type": "function_call",
            "status": "completed",
            "call_id": raw["call_id"],
            "name": raw["name"],
            "arguments": raw["arguments"],
        }
    if kind == "function_call_output":
        output = raw.get("output")
        if isinstance(output, list):
            output = "".join(p.get("text", "") for p in output if isinstance(p, dict))
        if not isinstance(raw.get("call_id"), str) or not isinstance(output, str):
            raise InvalidRequestError(
                f"Invalid value for '{where}': a function_call_output needs 'call_id' and a text 'output'.",
                param=where,
            )
        return {
            "id": given_id or item_id("function_call_output", owner_id, f"i{index}"),
            "type": "function_call_output",
            "status": "completed",
            "call_id": raw["call_id"],
            "output": output,
        }
    if kind == "reasoning":
        # The served models keep their own hidden tokens in the conversation state; a reasoning item adds nothing.
        return {"id": given_id or item_id("reasoning", owner_id, f"i{index}"), "type": "reasoning", "summary": []}
    raise UnsupportedParameterError(
        f"Input items of type {kind!r} are not supported (only messages, function_call, function_call_output, "
        "reasoning and item_reference).",
        param=f"{where}.type",
    )


def normalize_input(raw: str | list[dict[str, Any]] | None, owner_id: str, param: str = "input") -> list[dict]:
    if raw is None:
        return []
    if isinstance(raw, str):
        raw = [{"type": "message", "role": "user", "content": raw}]
    return [normalize(item, i, param, owner_id) for i, item in enumerate(raw)]


def instructions_text(instructions: str | list[dict[str, Any]] | None) -> list[tuple[str, str]]:
    """Instructions as (role, text) messages ahead of the history (a string is one developer message)."""
    if instructions is None:
        return []
    if isinstance(instructions, str):
        return [("developer", instructions)] if instructions else []
    out = []
    for i, item in enumerate(normalize_input(instructions, "resp_" + "0" * HEX_LENGTH, "instructions")):
        if item["type"] != "message":
            raise InvalidRequestError("Instructions must be messages.", param=f"instructions[{i}]")
        out.append((item["role"], "".join(p["text"] for p in item["content"])))
    return out


def to_messages(instructions: list[tuple[str, str]], history: list[dict[str, Any]]) -> list[pb.ChatMessage]:
    """The chat messages the worker renders. Consecutive function calls are one assistant turn with tool calls and
    no text, exactly as the worker produced them, so the worker continues from its own raw tokens."""
    messages = [pb.ChatMessage(role=ROLES[role], content=text) for role, text in instructions]
    for item in history:
        kind = item["type"]
        if kind == "message":
            text = "".join(p.get("text", "") for p in item["content"])
            messages.append(pb.ChatMessage(role=ROLES[item["role"]], content=text))
        elif kind == "function_call":
            last = messages[-1] if messages else None
            if last is None or last.role != pb.ROLE_ASSISTANT or not last.tool_calls:
                last = pb.ChatMessage(role=pb.ROLE_ASSISTANT, content="")
                messages.append(last)
            try:
                json.loads(item["arguments"])
            except ValueError:
                raise InvalidRequestError(
                    f"The arguments of function call {item['call_id']!r} must be valid JSON.", param="input"
                ) from None
            last.tool_calls.add(id=item["call_id"], function_name=item["name"], arguments_json=item["arguments"])
        elif kind == "function_call_output":
            messages.append(pb.ChatMessage(role=pb.ROLE_TOOL, content=item["output"], tool_call_id=item["call_id"]))
    return messages


def output_text(output: list[dict[str, Any]]) -> str:
    return "".join(p["text"] for item in output if item["type"] == "message" for p in item["content"] if "text" in p)
