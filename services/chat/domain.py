"""What the chat service computes, free of gRPC and of any engine library.

The servicer turns protos into these types and back; engines consume and produce only these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Role(StrEnum):
    SYSTEM = "system"
    DEVELOPER = "developer"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"
    CONTENT_FILTER = "content_filter"


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    function_name: str
    arguments_json: str


@dataclass(frozen=True, slots=True)
class Message:
    role: Role
    content: str
    name: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""


@dataclass(frozen=True, slots=True)
class Sampling:
    """Sampling knobs with OpenAI's defaults; None means "unset" where that differs from zero."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    n: int = 1


class ResponseFormatType(StrEnum):
    TEXT = "text"
    JSON_OBJECT = "json_object"
    JSON_SCHEMA = "json_schema"


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    type: ResponseFormatType = ResponseFormatType.TEXT
    json_schema: str = ""  # JSON text
    name: str = ""


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str
    parameters_json: str  # JSON Schema of the arguments, as JSON text


class ToolChoiceMode(StrEnum):
    AUTO = "auto"
    NONE = "none"
    REQUIRED = "required"
    FUNCTION = "function"


@dataclass(frozen=True, slots=True)
class ToolChoice:
    mode: ToolChoiceMode = ToolChoiceMode.AUTO
    function_name: str = ""
    # AUTO or REQUIRED restricted to these functions (OpenAI's `allowed_tools`); empty: every tool.
    allowed: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    request_id: str
    model: str
    messages: tuple[Message, ...]
    sampling: Sampling = Sampling()
    response_format: ResponseFormat = ResponseFormat()
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = ToolChoice()
    parallel_tool_calls: bool = True  # the model may make several calls in one turn
    session_id: str = ""
    api_key_hash: str = ""
    idle_timeout: float = 0.0
    conversation_key: str = ""  # the edge's name for the conversation within the session (ties, replacement)


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True, slots=True)
class Timings:
    time_to_first_token_seconds: float
    decode_seconds: float
    queue_seconds: float


@dataclass(frozen=True, slots=True)
class Admitted:
    """The request left the queue and now holds a slot: from here on the worker works on it (rendering, tokenising,
    compiling its output constraint, generating). The edge never retries a request elsewhere once it was admitted
    (it may be what killed the worker), so nothing risky may happen before this event."""

    queue_seconds: float


@dataclass(frozen=True, slots=True)
class Started:
    """The request holds a slot and its prompt is measured; computation starts now."""

    prompt_tokens: int
    cached_tokens: int
    state_tier: str = ""  # where the reused state came from: resident, host, disk ("" when nothing was reused)


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token: str
    logprob: float
    token_bytes: bytes


@dataclass(frozen=True, slots=True)
class PositionLogprobs:
    sampled: TokenLogprob
    top: tuple[TokenLogprob, ...]


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    index: int
    id: str = ""
    function_name: str = ""
    arguments_delta: str = ""


@dataclass(frozen=True, slots=True)
class Delta:
    """Output since the previous event."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[PositionLogprobs, ...] = ()
    tool_calls: tuple[ToolCallDelta, ...] = ()
    choice_index: int = 0


@dataclass(frozen=True, slots=True)
class Finished:
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    choice_index: int = 0
    more_choices: bool = False


GenerationEvent = Admitted | Started | Delta | Finished
