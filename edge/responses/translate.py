"""Pure translation of a Responses request into ChatService's generation request: the same sampling, tools and
constraint engine as chat (the chat translation does each job once; this module only reshapes Responses' fields
into it)."""

from __future__ import annotations

from typing import Any

from ark.chat.v1 import chat_service_pb2 as pb
from edge.chat import translate as chat
from edge.proto_ranges import check_integer
from edge.responses.schemas import CreateResponse
from services.common.config import LimitsConfig
from services.common.errors import InvalidRequestError, UnsupportedParameterError

# OpenAI's built-in tools: they run on OpenAI's side (search, a sandbox, a browser, an image model) and have no
# counterpart here. Refused by name, so that a client learns which one.
BUILT_IN_TOOLS = {
    "web_search": "web search",
    "web_search_preview": "web search",
    "web_search_2025_08_26": "web search",
    "web_search_preview_2025_03_11": "web search",
    "file_search": "file search",
    "code_interpreter": "code interpreter",
    "computer": "computer use",
    "computer_use_preview": "computer use",
    "mcp": "remote MCP servers",
    "image_generation": "image generation",
    "local_shell": "local shell",
    "shell": "shell",
    "apply_patch": "apply patch",
    "custom": "custom (free-form) tools",
}
INCLUDE_SUPPORTED = {"message.output_text.logprobs"}
# Accepted and nothing returned, as OpenAI does for its models without reasoning (Codex always asks for it).
INCLUDE_IGNORED = {"reasoning.encrypted_content"}


def function_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The request's tools in chat's shape (`{type, function: {...}}`); a built-in tool is a 400 naming it."""
    out = []
    for i, tool in enumerate(tools or []):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            what = BUILT_IN_TOOLS.get(str(kind), repr(kind))
            raise UnsupportedParameterError(
                f"The built-in tool '{kind}' ({what}) is not supported by ARK: only tools of type 'function' are.",
                param=f"tools[{i}].type",
            )
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: str | dict[str, Any] | None, tools: list[dict[str, Any]]) -> pb.ToolChoice:
    """Chat's tool choice for a Responses `tool_choice` (whose dict forms are flat: `{type, name}`, `{type, mode,
    tools}`); the offered tools are never narrowed, so every turn of a conversation renders the same prompt."""
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind == "function":
            return chat._tool_choice({"type": "function", "function": {"name": choice.get("name", "")}}, bool(tools))
        if kind == "allowed_tools":
            names = [str(t.get("name", "")) for t in choice.get("tools") or [] if isinstance(t, dict)]
            return chat.allowed_tools_choice(choice.get("mode", "auto"), names, bool(tools))
        if kind in BUILT_IN_TOOLS:
            raise UnsupportedParameterError(f"The built-in tool '{kind}' is not supported.", param="tool_choice")
        raise InvalidRequestError(f"Invalid value for 'tool_choice': type {kind!r}.", param="tool_choice")
    return chat._tool_choice(choice, bool(tools))


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    fmt = (text or {}).get("format")
    if not isinstance(fmt, dict):
        return None
    if fmt.get("type") == "json_schema":
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        if not fmt.get("name") or not isinstance(fmt.get("schema"), dict):
            raise InvalidRequestError("text.format of type json_schema needs 'name' and 'schema'.", param="text.format")
        return {"type": "json_schema", "json_schema": spec}
    return {"type": fmt.get("type", "text")}


def check_include(include: list[str] | None) -> bool:
    """Whether output-text logprobs are asked for; anything else unknown is a 400."""
    for i, value in enumerate(include or []):
        if value not in INCLUDE_SUPPORTED | INCLUDE_IGNORED:
            raise UnsupportedParameterError(
                f"include value {value!r} is not supported (supported: message.output_text.logprobs; accepted and "
                "empty: reasoning.encrypted_content).",
                param=f"include[{i}]",
            )
    return "message.output_text.logprobs" in (include or [])


def request_to_proto(
    body: CreateResponse,
    messages: list[pb.ChatMessage],
    *,
    model_id: str,
    request_id: str,
    api_key_hash: str,
    limits: LimitsConfig,
) -> pb.StreamGenerateChatCompletionRequest:
    """The generation request for a Responses request whose history is already `messages`."""
    if len(messages) > limits.max_messages:
        raise InvalidRequestError(
            f"Invalid value for 'input': at most {limits.max_messages} items are allowed.", param="input"
        )
    if body.max_output_tokens is not None and body.max_output_tokens > limits.max_tokens:
        raise InvalidRequestError(
            f"Invalid value for 'max_output_tokens': {body.max_output_tokens} is greater than the maximum of "
            f"{limits.max_tokens}.",
            param="max_output_tokens",
            code="invalid_value",
        )
    sampling = pb.SamplingParams(n=1)
    if body.max_output_tokens is not None:
        sampling.max_tokens = check_integer(
            body.max_output_tokens, param="max_output_tokens", message=pb.SamplingParams.DESCRIPTOR, field="max_tokens"
        )
    for field in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed"):
        value = getattr(body, field)
        if value is not None:
            setattr(sampling, field, value)
    sampling.logprobs = check_include(body.include)
    sampling.top_logprobs = body.top_logprobs or 0 if sampling.logprobs else 0
    tools = function_tools(body.tools)
    request = pb.StreamGenerateChatCompletionRequest(
        request_id=request_id,
        model=model_id,
        messages=messages,
        sampling=sampling,
        response_format=chat._response_format(_response_format(body.text)),
        tools=chat._tools(tools),
        tool_choice=_tool_choice(body.tool_choice, tools),
        parallel_tool_calls=body.parallel_tool_calls is not False,
    )
    request.session.api_key_hash = api_key_hash
    return request


def logprobs_to_json(positions: Any) -> list[dict[str, Any]]:
    """Output-text logprobs (OpenAI's LogProb: token, logprob, bytes, top_logprobs)."""
    return chat.logprobs_to_json(positions)


def delta_logprobs(positions: Any) -> list[dict[str, Any]]:
    """Logprobs of a text delta event (ResponseLogProb: token, logprob, top_logprobs of token and logprob)."""
    return [
        {
            "token": p.sampled.token,
            "logprob": p.sampled.logprob,
            "top_logprobs": [{"token": t.token, "logprob": t.logprob} for t in p.top],
        }
        for p in positions
    ]
