"""Pure translation between OpenAI's chat JSON and ChatService protos (no I/O, unit-tested)."""

from __future__ import annotations

import hashlib
from typing import Any

from ark.chat.v1 import chat_service_pb2 as pb
from edge.chat.schemas import ChatCompletionRequest, ChatMessageIn
from services.common.config import LimitsConfig, ModelConfig
from services.common.errors import InvalidRequestError, UnsupportedParameterError

_ROLES = {
    "system": pb.ROLE_SYSTEM,
    "developer": pb.ROLE_DEVELOPER,
    "user": pb.ROLE_USER,
    "assistant": pb.ROLE_ASSISTANT,
    "tool": pb.ROLE_TOOL,
}
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
    for call in message.tool_calls or ():
        out.tool_calls.add(id=call.id, function_name=call.function.name, arguments_json=call.function.arguments)
    if message.tool_call_id:
        out.tool_call_id = message.tool_call_id
    return out


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
    _, max_tokens = _max_tokens(body, limits)
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    for field in ("temperature", "top_p", "seed", "top_k", "min_p", "repetition_penalty"):
        value = getattr(body, field)
        if value is not None:
            setattr(sampling, field, value)
    request = pb.StreamGenerateChatCompletionRequest(
        request_id=request_id,
        model=model_id,
        messages=[message_to_proto(i, m) for i, m in enumerate(body.messages)],
        sampling=sampling,
    )
    request.session.api_key_hash = api_key_hash
    return request


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
