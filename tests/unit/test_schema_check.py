"""The schema checks that run before any compiling: what is refused, with which param and keyword, and how fast."""

import json
import time

import pytest

from services.chat.grammar.schema_check import SchemaLimits, check_schema
from services.common.errors import InvalidRequestError

LIMITS = SchemaLimits()


def refuse(schema, limits=LIMITS) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        check_schema(schema, limits, param="response_format", where="response_format.json_schema.schema")
    assert info.value.param == "response_format"
    return info.value


def nest(levels: int) -> dict:
    return json.loads('{"type": "array", "items": ' * levels + '{"type": "integer"}' + "}" * levels)


OPENAI_EXAMPLES = [
    {  # structured outputs' math tutor example, strict
        "type": "object",
        "properties": {
            "steps": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"explanation": {"type": "string"}, "output": {"type": "string"}},
                    "required": ["explanation", "output"],
                    "additionalProperties": False,
                },
            },
            "final_answer": {"type": "string"},
        },
        "required": ["steps", "final_answer"],
        "additionalProperties": False,
    },
    {  # recursive UI schema with $defs, anyOf, enum, const, descriptions
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "UI",
        "type": "object",
        "properties": {"root": {"$ref": "#/$defs/node"}, "kind": {"const": "ui"}},
        "required": ["root", "kind"],
        "additionalProperties": False,
        "$defs": {
            "node": {
                "type": "object",
                "description": "A UI element",
                "properties": {
                    "type": {"type": "string", "enum": ["div", "button", "header"]},
                    "label": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                },
                "required": ["type", "label", "children"],
                "additionalProperties": False,
            }
        },
    },
    {"type": "object", "properties": {"a": {"$ref": "#"}}, "default": {"a": None}, "examples": [{}]},
]


@pytest.mark.parametrize("schema", OPENAI_EXAMPLES)
def test_schemas_openai_accepts_pass(schema):
    assert check_schema(schema, LIMITS, param="p", where="w") > 0


@pytest.mark.parametrize(
    ("schema", "keyword", "code"),
    [
        ({"type": "string", "maxLength": 100000}, "maxLength", "schema_too_complex"),
        ({"type": "string", "minLength": 100000}, "minLength", "schema_too_complex"),
        ({"type": "string", "maxLength": -1}, "maxLength", "invalid_schema"),
        ({"type": "string", "pattern": "a{0,100000}"}, "{0,100000}", "schema_too_complex"),
        ({"type": "string", "pattern": "a" * 2000}, "pattern", "schema_too_complex"),
        ({"type": "array", "minItems": 1_000_000_000}, "minItems", "schema_too_complex"),
        ({"type": "array", "minItems": 3, "maxItems": 2}, "minItems", "invalid_schema"),
        ({"type": "integer", "minimum": 5, "maximum": 1}, "lower bound 5", "invalid_schema"),
        ({"type": "number", "exclusiveMinimum": 1, "exclusiveMaximum": 1}, "between", "invalid_schema"),
        ({"enum": [f"v{i}" for i in range(100_000)]}, "bytes", "schema_too_complex"),
        ({"enum": list(range(2000))}, "enum values", "schema_too_complex"),
        ({"$ref": "https://example.com/schema.json"}, "remote", "invalid_schema"),
        ({"$ref": "#/$defs/missing"}, "does not resolve", "invalid_schema"),
        ({"type": "array", "uniqueItems": True}, "'uniqueItems'", "unsupported_schema_keyword"),
        ({"type": "object", "patternProperties": {"^a": {}}}, "'patternProperties'", "unsupported_schema_keyword"),
        ({"type": "string", "format": "credit-card"}, "credit-card", "unsupported_schema_keyword"),
        ({"type": "strange"}, "'type'", "invalid_schema"),
        ({"type": "object", "properties": {"a": {"not": {}}}}, "'not'", "unsupported_schema_keyword"),
        (nest(100), "deeper than 32", "schema_too_complex"),
    ],
)
def test_hostile_and_unenforceable_schemas_are_refused_by_name_fast(schema, keyword, code):
    started = time.perf_counter()
    error = refuse(schema)
    assert time.perf_counter() - started < 0.1  # loose: the point is "before any compiling", not a benchmark
    assert keyword in error.message and error.code == code


def test_the_path_of_the_offending_keyword_is_named():
    error = refuse({"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}})
    assert "#/properties/tags" in error.message


def test_limits_are_configurable():
    small = SchemaLimits(max_length_bound=10)
    assert "at most 10" in refuse({"type": "string", "maxLength": 11}, small).message
    assert check_schema({"type": "string", "maxLength": 10}, small, param="p", where="w")


def test_size_counts_the_whole_schema():
    schema = {"type": "object", "description": "x" * 70_000}
    assert "bytes" in refuse(schema).message
