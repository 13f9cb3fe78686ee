"""Messages as chat templates expect them, and the tool instructions models without native tool support need.

Engine-agnostic: every engine renders with its model's own template (llama.cpp from the GGUF metadata,
TensorRT-LLM through the Hugging Face tokenizer), and both take the same dictionaries.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from services.chat.domain import GenerationRequest, Message, Role
from services.chat.tools import format_calls, tool_instructions


def with_tool_instructions(request: GenerationRequest) -> tuple[Message, ...]:
    """The messages, with the tool-calling instructions added to (or as) the system message.

    Every tool is described whatever `tool_choice` says ("none" and `allowed_tools` included; the output
    constraint enforces it): a conversation's turns then render the same prompt prefix and reuse each other's state.
    """
    if not request.tools:
        return request.messages
    instructions = tool_instructions(request.tools)
    first = request.messages[0]
    if first.role in (Role.SYSTEM, Role.DEVELOPER):
        return (replace(first, content=f"{first.content}\n\n{instructions}"), *request.messages[1:])
    return (Message(Role.SYSTEM, instructions), *request.messages)


def template_message(message: Message) -> dict[str, Any]:
    """One message as a chat-template dictionary (OpenAI's shape, which Hugging Face templates read)."""
    content = message.content
    if message.tool_calls and not content:
        # Templates without tool support would drop the calls: show the model its calls as it writes them.
        content = format_calls(message.tool_calls)
    out: dict[str, Any] = {"role": str(message.role), "content": content}
    if message.name:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.function_name, "arguments": c.arguments_json}}
            for c in message.tool_calls
        ]
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    return out
