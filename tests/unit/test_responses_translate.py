"""Responses items and requests translated into chat generation requests (pure functions)."""

from __future__ import annotations

import pytest

from ark.chat.v1 import chat_service_pb2 as pb
from edge.compat import RESPONSES, RESPONSES_EXTENSIONS, apply_policy
from edge.responses import items as it
from edge.responses import translate
from edge.responses.schemas import CreateResponse, Response
from services.common.config import LimitsConfig
from services.common.errors import InvalidRequestError, UnsupportedParameterError

OWNER = "resp_" + "a" * 32


def proto(**body) -> pb.StreamGenerateChatCompletionRequest:
    request = CreateResponse.model_validate({"model": "m", "input": "hi", **body})
    messages = it.to_messages([], it.normalize_input(request.input, OWNER))
    return translate.request_to_proto(
        request, messages, model_id="m", request_id="r", api_key_hash="k", limits=LimitsConfig()
    )


def test_a_string_input_is_one_user_message_with_an_id_naming_its_response():
    [item] = it.normalize_input("hello", OWNER)
    assert item["type"] == "message" and item["role"] == "user" and item["status"] == "completed"
    assert item["content"] == [{"type": "input_text", "text": "hello"}]
    assert it.owner_hex(item["id"]) == "a" * 32


def test_history_becomes_the_chat_turns_the_worker_produced():
    history = it.normalize_input(
        [
            {"role": "user", "content": "weather?"},
            {"type": "function_call", "call_id": "c1", "name": "w", "arguments": '{"city":"Paris"}'},
            {"type": "function_call", "call_id": "c2", "name": "w", "arguments": '{"city":"Rome"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "21"},
            {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "19"}]},
            {"type": "reasoning", "summary": []},
            {"role": "assistant", "content": [{"type": "output_text", "text": "Warm."}]},
        ],
        OWNER,
    )
    messages = it.to_messages([("developer", "Be brief.")], history)
    assert [m.role for m in messages] == [
        pb.ROLE_DEVELOPER,
        pb.ROLE_USER,
        pb.ROLE_ASSISTANT,
        pb.ROLE_TOOL,
        pb.ROLE_TOOL,
        pb.ROLE_ASSISTANT,
    ]
    assert [c.id for c in messages[2].tool_calls] == ["c1", "c2"] and messages[2].content == ""
    assert messages[4].content == "19" and messages[5].content == "Warm."


def test_an_item_reference_stays_a_reference_until_resolved():
    [ref] = it.normalize_input([{"type": "item_reference", "id": "msg_x"}], OWNER)
    assert ref == {"type": "item_reference", "id": "msg_x"}
    assert it.owner_hex("msg_x") is None


@pytest.mark.parametrize(
    "kind", ["web_search", "file_search", "code_interpreter", "computer_use_preview", "mcp", "image_generation"]
)
def test_built_in_tools_are_refused_by_name(kind):
    with pytest.raises(UnsupportedParameterError) as e:
        proto(tools=[{"type": kind}])
    assert kind in e.value.message and e.value.param == "tools[0].type"


def test_function_tools_text_format_and_sampling_reach_the_chat_request():
    tool = {"type": "function", "name": "w", "parameters": {"type": "object"}, "strict": True}
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    request = proto(
        tools=[tool],
        tool_choice={"type": "function", "name": "w"},
        text={"format": {"type": "json_schema", "name": "s", "schema": schema}},
        max_output_tokens=7,
        temperature=0.5,
        top_logprobs=3,
        include=["message.output_text.logprobs", "reasoning.encrypted_content"],
    )
    assert request.tools[0].name == "w" and request.tools[0].strict
    assert request.tool_choice.mode == pb.TOOL_CHOICE_MODE_FUNCTION and request.tool_choice.function_name == "w"
    assert request.response_format.type == pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA
    assert request.sampling.max_tokens == 7 and request.sampling.logprobs and request.sampling.top_logprobs == 3


def test_allowed_tools_restrict_the_calls_and_keep_every_tool_in_the_prompt():
    tools = [{"type": "function", "name": n} for n in ("a", "b")]
    choice = {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "b"}]}
    request = proto(tools=tools, tool_choice=choice)
    assert [t.name for t in request.tools] == ["a", "b"] and request.tool_choice.mode == pb.TOOL_CHOICE_MODE_REQUIRED
    assert list(request.tool_choice.allowed_function_names) == ["b"]
    with pytest.raises(InvalidRequestError):
        proto(tools=tools, tool_choice={**choice, "mode": "none"})
    request = proto(tools=tools, tool_choice="none")
    assert [t.name for t in request.tools] == ["a", "b"] and request.tool_choice.mode == pb.TOOL_CHOICE_MODE_NONE


def test_unknown_include_values_are_refused():
    with pytest.raises(UnsupportedParameterError):
        proto(include=["file_search_call.results"])


def test_bad_function_call_arguments_are_a_400():
    with pytest.raises(InvalidRequestError):
        it.to_messages(
            [], it.normalize_input([{"type": "function_call", "call_id": "c", "name": "n", "arguments": "{"}], OWNER)
        )


def test_every_create_response_field_has_a_policy_and_extensions_are_listed():
    fields = set(CreateResponse.model_fields)
    assert fields - set(RESPONSES) == set(RESPONSES_EXTENSIONS)
    assert apply_policy(RESPONSES, CreateResponse(model="m", user="u", reasoning={"effort": "low"})) == [
        "reasoning",
        "user",
    ]
    with pytest.raises(UnsupportedParameterError):
        apply_policy(RESPONSES, CreateResponse(model="m", prompt={"id": "p"}))


def test_a_response_object_serialises_every_required_field():
    body = Response(id="resp_1", created_at=1, status="completed", model="m", text={}, tool_choice="auto", tools=[])
    dumped = body.model_dump(mode="json")
    for field in ("error", "incomplete_details", "instructions", "metadata", "temperature", "top_p", "output"):
        assert field in dumped
