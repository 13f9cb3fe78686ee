"""Tools as the edge passes them to a chat worker: names unique and well-formed, `parallel_tool_calls` carried."""

import pytest

from edge.chat.schemas import ChatCompletionRequest
from edge.chat.translate import request_to_proto
from services.common.config import LimitsConfig
from services.common.errors import InvalidRequestError


def tool(name: str) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}}


def build(**fields):
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **fields)
    return request_to_proto(body, model_id="m", request_id="r", api_key_hash="k", limits=LimitsConfig())


def test_duplicate_tool_names_are_400_naming_the_second():
    with pytest.raises(InvalidRequestError) as info:
        build(tools=[tool("get_weather"), tool("get_time"), tool("get_weather")])
    assert info.value.param == "tools[2].function.name" and "tools[0]" in info.value.message


@pytest.mark.parametrize("name", ["has space", "x" * 65, 'quote"d', "ünïcode"])
def test_tool_names_follow_openais_pattern(name):
    with pytest.raises(InvalidRequestError) as info:
        build(tools=[tool(name)])
    assert info.value.param == "tools[0].function.name"


def test_parallel_tool_calls_is_on_unless_false():
    assert build(tools=[tool("a"), tool("b")]).parallel_tool_calls is True
    assert build(tools=[tool("a")], parallel_tool_calls=False).parallel_tool_calls is False
