import json

from services.chat.domain import ToolCall
from services.chat.tools import ToolCallParser, format_calls


def feed(parser: ToolCallParser, pieces: list[str]) -> tuple[str, list]:
    text, deltas = "", []
    for piece in pieces:
        t, d = parser.push(piece)
        text += t
        deltas += d
    t, d = parser.finish()
    return text + t, deltas + d


def calls_of(deltas: list) -> list[dict]:
    """Assemble deltas the way OpenAI's SDKs do (by index), checking each delta's shape on the way."""
    calls: dict[int, dict] = {}
    for d in deltas:
        if d.index not in calls:
            assert d.id.startswith("call_") and d.function_name and d.arguments_delta == "", d
            calls[d.index] = {"id": d.id, "name": d.function_name, "arguments": ""}
        else:
            assert not d.id and not d.function_name, d
            calls[d.index]["arguments"] += d.arguments_delta
    return [calls[i] for i in sorted(calls)]


def test_call_streams_name_first_then_argument_fragments():
    pieces = ['{"na', 'me": "get_weather", "argum', 'ents": {"city"', ': "Paris"', "}", "}"]
    text, deltas = feed(ToolCallParser(expect_call=True), pieces)
    assert text == ""
    (call,) = calls_of(deltas)
    assert call["name"] == "get_weather"
    assert json.loads(call["arguments"]) == {"city": "Paris"} and call["arguments"] == '{"city": "Paris"}'


def test_braces_and_quotes_inside_argument_strings_do_not_end_the_call():
    args = '{"q": "a } b \\" { c", "n": [1, {"x": "]"}]}'
    _, deltas = feed(ToolCallParser(expect_call=True), ['{"name": "s", "arguments": ', *args, "}"])
    (call,) = calls_of(deltas)
    assert call["arguments"] == args and json.loads(call["arguments"])["q"] == 'a } b " { c'


def test_parallel_calls_one_per_line_get_indexes_0_and_1():
    out = '{"name": "a", "arguments": {"x": 1}}\n{"name": "b", "arguments": {}}'
    text, deltas = feed(ToolCallParser(expect_call=True), [out[i : i + 3] for i in range(0, len(out), 3)])
    calls = calls_of(deltas)
    assert [c["name"] for c in calls] == ["a", "b"]
    assert [json.loads(c["arguments"]) for c in calls] == [{"x": 1}, {}]
    assert calls[0]["id"] != calls[1]["id"] and text == ""


def test_auto_mode_passes_plain_text_through():
    parser = ToolCallParser(expect_call=False)
    text, deltas = feed(parser, ["  Hello", " there {not a call}"])
    assert text == "  Hello there {not a call}" and deltas == [] and not parser.made_call


def test_auto_mode_detects_a_call():
    parser = ToolCallParser(expect_call=False)
    _, deltas = feed(parser, [' {"name": "f", "arguments": {}}'])
    assert parser.made_call and calls_of(deltas)[0]["arguments"] == "{}"


def test_auto_mode_passes_a_json_answer_through_as_content():
    for answer in ('{"n": 42}', '{"name": "Ada", "age": 3}', '{"name": 1}'):
        parser = ToolCallParser(expect_call=False)
        text, deltas = feed(parser, [answer[i : i + 2] for i in range(0, len(answer), 2)])
        assert text == answer and deltas == [] and not parser.made_call


def test_auto_mode_cut_before_a_call_was_known_is_content():
    parser = ToolCallParser(expect_call=False)
    text, deltas = feed(parser, ['{"name": "Al'])
    assert text == '{"name": "Al' and deltas == [] and not parser.made_call


def test_a_call_cut_short_keeps_what_it_streamed():
    parser = ToolCallParser(expect_call=True)
    _, deltas = feed(parser, ['{"name": "f", "arguments": {"city": "Par'])
    assert parser.made_call and calls_of(deltas)[0]["arguments"] == '{"city": "Par'


def test_a_head_cut_short_is_no_call():
    parser = ToolCallParser(expect_call=True)
    text, deltas = feed(parser, ['{"name": "get_wea'])
    assert not parser.made_call and deltas == [] and text == ""


def test_format_calls_is_what_the_parser_reads():
    calls = (ToolCall("call_1", "a", '{"x": 1}'), ToolCall("call_2", "b", "{}"))
    _, deltas = feed(ToolCallParser(expect_call=True), [format_calls(calls)])
    assert [(c["name"], c["arguments"]) for c in calls_of(deltas)] == [("a", '{"x": 1}'), ("b", "{}")]
