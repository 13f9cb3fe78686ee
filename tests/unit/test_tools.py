import json

from services.chat.tools import ToolCallParser


def feed(parser: ToolCallParser, pieces: list[str]) -> tuple[str, list]:
    text, deltas = "", []
    for piece in pieces:
        t, d = parser.push(piece)
        text += t
        deltas += d
    t, d = parser.finish()
    return text + t, deltas + d


def test_call_streams_name_first_then_argument_fragments():
    pieces = ['{"na', 'me": "get_weather", "argum', 'ents": {"city"', ': "Paris"', "} ", "}"]
    text, deltas = feed(ToolCallParser(expect_call=True), pieces)
    assert text == ""
    assert deltas[0].function_name == "get_weather" and deltas[0].id.startswith("call_")
    arguments = "".join(d.arguments_delta for d in deltas)
    assert json.loads(arguments) == {"city": "Paris"} and arguments == '{"city": "Paris"}'


def test_auto_mode_passes_plain_text_through():
    text, deltas = feed(ToolCallParser(expect_call=False), ["  Hello", " there {not a call}"])
    assert text == "  Hello there {not a call}" and deltas == []


def test_auto_mode_detects_a_call():
    parser = ToolCallParser(expect_call=False)
    _, deltas = feed(parser, [' {"name": "f", "arguments": {}}'])
    assert parser.made_call and "".join(d.arguments_delta for d in deltas) == "{}"
