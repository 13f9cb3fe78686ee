"""Pure translation between OpenAI's chat JSON and ChatService protos (no I/O, unit-tested)."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from ark.chat.v1 import chat_service_pb2 as pb
from edge.chat.schemas import ChatCompletionRequest, ChatMessageIn
from edge.proto_ranges import check_integer
from services.common.config import LimitsConfig, ModelConfig
from services.common.errors import InvalidRequestError, UnsupportedParameterError, clip

_ROLES = {
    "system": pb.ROLE_SYSTEM,
    "developer": pb.ROLE_DEVELOPER,
    "user": pb.ROLE_USER,
    "assistant": pb.ROLE_ASSISTANT,
    "tool": pb.ROLE_TOOL,
}
# Integer parameters and the SamplingParams field each is sent in: each is checked against its field's range.
SAMPLING_INTEGERS = {
    "max_tokens": "max_tokens",
    "max_completion_tokens": "max_tokens",
    "seed": "seed",
    "top_k": "top_k",
    "top_logprobs": "top_logprobs",
    "n": "n",
}
_TOKEN_ID = re.compile(r"^[0-9]{1,20}$")
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's pattern for function names
FINISH_REASONS = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_TOOL_CALLS: "tool_calls",
    pb.FINISH_REASON_CONTENT_FILTER: "content_filter",
}


def _content(i: int, message: ChatMessageIn) -> str:
    if message.content is None:
        if message.role == "assistant" and message.tool_calls:
            return ""
        raise InvalidRequestError(
            f"Invalid value for 'messages[{i}].content': content is required for {message.role} messages.",
            param=f"messages[{i}].content",
        )
    if isinstance(message.content, str):
        return message.content
    texts = []
    for j, part in enumerate(message.content):
        if part.type not in ("text", "refusal") or part.text is None:
            raise UnsupportedParameterError(
                f"Content parts of type '{part.type}' are not supported: the served models read text only.",
                param=f"messages[{i}].content[{j}].type",
            )
        texts.append(part.text)
    return "".join(texts)


def message_to_proto(i: int, message: ChatMessageIn) -> pb.ChatMessage:
    if message.role == "function":
        raise UnsupportedParameterError(
            "The deprecated 'function' role is not supported; use 'tool' messages.", param=f"messages[{i}].role"
        )
    out = pb.ChatMessage(role=_ROLES[message.role], content=_content(i, message), name=message.name or "")
    for j, call in enumerate(message.tool_calls or ()):
        _check_arguments(call.function.arguments, f"messages[{i}].tool_calls[{j}].function.arguments")
        out.tool_calls.add(id=call.id, function_name=call.function.name, arguments_json=call.function.arguments)
    if message.tool_call_id:
        out.tool_call_id = message.tool_call_id
    return out


def _check_arguments(arguments: str, param: str) -> None:
    """A tool call's arguments are a JSON text (what the model wrote); a chat template parses them."""
    try:
        json.loads(arguments)
    except (ValueError, RecursionError):
        raise InvalidRequestError(
            f"Invalid value for '{param}': the arguments of a tool call must be valid JSON.",
            param=param,
            code="invalid_value",
        ) from None


def _check_integers(body: ChatCompletionRequest) -> None:
    for param, field in SAMPLING_INTEGERS.items():
        value = getattr(body, param)
        if value is not None:
            check_integer(value, param=param, message=pb.SamplingParams.DESCRIPTOR, field=field)


def _stops(stop: str | list[str] | None, limits: LimitsConfig) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > limits.max_stop_sequences:
        raise InvalidRequestError(
            f"Invalid value for 'stop': at most {limits.max_stop_sequences} stop sequences are allowed.", param="stop"
        )
    return [s for s in stops if s]


def _max_tokens(body: ChatCompletionRequest, limits: LimitsConfig) -> tuple[str, int | None]:
    both = body.max_tokens is not None and body.max_completion_tokens is not None
    if both and body.max_tokens != body.max_completion_tokens:
        raise InvalidRequestError(
            "Set either 'max_tokens' or 'max_completion_tokens', not both.", param="max_completion_tokens"
        )
    name, value = (
        ("max_completion_tokens", body.max_completion_tokens)
        if body.max_completion_tokens is not None
        else ("max_tokens", body.max_tokens)
    )
    if value is not None and value > limits.max_tokens:
        raise InvalidRequestError(
            f"Invalid value for '{name}': {value} is greater than the maximum of {limits.max_tokens}.",
            param=name,
            code="invalid_value",
        )
    return name, value


def request_to_proto(
    body: ChatCompletionRequest,
    *,
    model_id: str,
    request_id: str,
    api_key_hash: str,
    limits: LimitsConfig,
) -> pb.StreamGenerateChatCompletionRequest:
    """Build the gRPC request; raises InvalidRequestError for what the schema alone cannot check."""
    if len(body.messages) > limits.max_messages:
        raise InvalidRequestError(
            f"Invalid value for 'messages': at most {limits.max_messages} messages are allowed.", param="messages"
        )
    sampling = pb.SamplingParams(
        stop=_stops(body.stop, limits),
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
    )
    _, max_tokens = _max_tokens(body, limits)  # the configured limit first: its message is the more useful
    _check_integers(body)
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    for field in ("temperature", "top_p", "seed", "top_k", "min_p", "repetition_penalty"):
        value = getattr(body, field)
        if value is not None:
            setattr(sampling, field, value)
    sampling.n = _n(body.n, limits)
    sampling.logprobs, sampling.top_logprobs = _logprobs(body)
    sampling.logit_bias.update(_logit_bias(body.logit_bias))
    request = pb.StreamGenerateChatCompletionRequest(
        request_id=request_id,
        model=model_id,
        messages=[message_to_proto(i, m) for i, m in enumerate(body.messages)],
        sampling=sampling,
        response_format=_response_format(body.response_format),
        tools=_tools(body.tools or []),
        tool_choice=_tool_choice(body.tool_choice, bool(body.tools)),
        parallel_tool_calls=body.parallel_tool_calls is not False,
    )
    request.session.api_key_hash = api_key_hash
    return request


def _n(n: int | None, limits: LimitsConfig) -> int:
    if n is not None and n > limits.max_n:
        raise InvalidRequestError(f"Invalid value for 'n': at most {limits.max_n} choices are allowed.", param="n")
    return n or 1


def _logprobs(body: ChatCompletionRequest) -> tuple[bool, int]:
    if body.top_logprobs and not body.logprobs:
        raise InvalidRequestError("'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs")
    return bool(body.logprobs), body.top_logprobs or 0


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        if not _TOKEN_ID.match(key):
            raise InvalidRequestError(
                f"Invalid value for 'logit_bias': key {clip(key, 40)!r} is not a token id.", param="logit_bias"
            )
        token = check_integer(
            int(key), param="logit_bias", message=pb.SamplingParams.DESCRIPTOR, field="logit_bias.key"
        )
        if not -100 <= value <= 100:
            raise InvalidRequestError(
                f"Invalid value for 'logit_bias': bias {value} for token {key} is outside -100..100.",
                param="logit_bias",
            )
        out[token] = value
    return out


def _response_format(fmt: dict[str, Any] | None) -> pb.ResponseFormat:
    kind = (fmt or {}).get("type", "text")
    if kind == "text":
        return pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_TEXT)
    if kind == "json_object":
        return pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT)
    if kind == "json_schema":
        spec = fmt.get("json_schema") if isinstance(fmt, dict) else None
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict) or not spec.get("name"):
            raise InvalidRequestError(
                "response_format.json_schema must be an object with 'name' and 'schema'.", param="response_format"
            )
        return pb.ResponseFormat(
            type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
            json_schema=json.dumps(spec.get("schema") or {}),
            schema_name=str(spec["name"]),
        )
    raise InvalidRequestError(
        f"Invalid value for 'response_format.type': {kind!r} (expected 'text', 'json_object' or 'json_schema').",
        param="response_format.type",
    )


def _tools(tools: list[dict[str, Any]]) -> list[pb.Tool]:
    """The tools, each a function with a valid name used once (a name is how a call says which function it is)."""
    out: list[pb.Tool] = []
    seen: dict[str, int] = {}
    for i, tool in enumerate(tools):
        converted = _tool(i, tool)
        if converted.name in seen:
            raise InvalidRequestError(
                f"Invalid 'tools[{i}].function.name': the name '{converted.name}' is already used by "
                f"tools[{seen[converted.name]}]; tool names must be unique.",
                param=f"tools[{i}].function.name",
            )
        seen[converted.name] = i
        out.append(converted)
    return out


def _tool(i: int, tool: dict[str, Any]) -> pb.Tool:
    if tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise UnsupportedParameterError(
            f"Only tools of type 'function' are supported (tools[{i}] is {tool.get('type')!r}).", param=f"tools[{i}]"
        )
    function = tool["function"]
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequestError(f"Missing required parameter: 'tools[{i}].function.name'.", param=f"tools[{i}]")
    if not _TOOL_NAME.fullmatch(name):
        raise InvalidRequestError(
            f"Invalid 'tools[{i}].function.name': {clip(name, 64)!r} must be 1 to 64 letters, digits, '_' or '-'.",
            param=f"tools[{i}].function.name",
        )
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    return pb.Tool(
        name=name,
        description=str(function.get("description") or ""),
        parameters_json=json.dumps(parameters),
        strict=bool(function.get("strict")),
    )


def _tool_choice(choice: str | dict[str, Any] | None, has_tools: bool) -> pb.ToolChoice:
    if choice is None:
        return pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_AUTO if has_tools else pb.TOOL_CHOICE_MODE_NONE)
    modes = {
        "auto": pb.TOOL_CHOICE_MODE_AUTO,
        "none": pb.TOOL_CHOICE_MODE_NONE,
        "required": pb.TOOL_CHOICE_MODE_REQUIRED,
    }
    if isinstance(choice, str) and choice in modes:
        if choice != "none" and not has_tools:
            raise InvalidRequestError(f"tool_choice '{choice}' needs 'tools'.", param="tool_choice")
        return pb.ToolChoice(mode=modes[choice])
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        if not has_tools:
            raise InvalidRequestError("tool_choice names a function but no 'tools' were given.", param="tool_choice")
        return pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_FUNCTION, function_name=str(choice["function"].get("name", "")))
    if (
        isinstance(choice, dict)
        and choice.get("type") == "allowed_tools"
        and isinstance(choice.get("allowed_tools"), dict)
    ):
        allowed = choice["allowed_tools"]
        names = [
            str(t["function"].get("name", ""))
            for t in allowed.get("tools") or []
            if isinstance(t, dict) and isinstance(t.get("function"), dict)
        ]
        return allowed_tools_choice(allowed.get("mode", "auto"), names, has_tools)
    raise InvalidRequestError(
        "Invalid value for 'tool_choice': expected 'none', 'auto', 'required', a function or allowed_tools.",
        param="tool_choice",
    )


def allowed_tools_choice(mode: Any, names: list[str], has_tools: bool) -> pb.ToolChoice:
    """OpenAI's `allowed_tools`: auto or required among the named functions. The tools themselves stay as given
    (the worker's constraint enforces the restriction), so the prompt is the same whatever the choice."""
    if mode not in ("auto", "required"):
        raise InvalidRequestError("tool_choice.mode must be 'auto' or 'required'.", param="tool_choice.mode")
    if not names or not has_tools:
        raise InvalidRequestError("tool_choice.allowed_tools names no function tools.", param="tool_choice")
    kind = pb.TOOL_CHOICE_MODE_AUTO if mode == "auto" else pb.TOOL_CHOICE_MODE_REQUIRED
    return pb.ToolChoice(mode=kind, allowed_function_names=names)


def logprobs_to_json(positions: Any) -> list[dict[str, Any]]:
    def entry(e: pb.TokenLogprob) -> dict[str, Any]:
        return {"token": e.token, "logprob": e.logprob, "bytes": list(e.token_bytes)}

    return [{**entry(p.sampled), "top_logprobs": [entry(t) for t in p.top]} for p in positions]


def usage_to_json(usage: pb.Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def fingerprint(model: ModelConfig) -> str:
    """OpenAI's `system_fingerprint`: changes when the serving configuration (model file, engine, settings) does."""
    identity = f"{model.id}|{model.engine}|{model.path}|{sorted(model.settings.items())}"
    return "fp_" + hashlib.sha256(identity.encode()).hexdigest()[:10]
