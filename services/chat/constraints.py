"""Grammar-constrained decoding: JSON mode, JSON Schema outputs and forced tool calls, as GBNF grammars.

A constraint that cannot be compiled is a 400 naming the parameter: ARK never silently generates unconstrained
text for a request that asked for structure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from services.chat.domain import GenerationRequest, ResponseFormatType, ToolChoiceMode
from services.chat.tools import call_schema
from services.common.errors import InvalidRequestError

# Plain text that does not start with "{": the alternative to a tool call under tool_choice "auto".
_TEXT_RULES = "text ::= [^{ \\t\\n] [^\\x00]*\n"


@dataclass(frozen=True, slots=True)
class Constraint:
    gbnf: str
    tool_call: str  # "" (no tools), "required" or "auto"


def _schema_gbnf(schema: object, param: str) -> str:
    try:
        return json_schema_to_gbnf(json.dumps(schema), prop_order=["name", "arguments"])
    except Exception as exc:
        raise InvalidRequestError(
            f"Invalid value for '{param}': ARK cannot compile this schema ({exc}).", param=param, code="invalid_schema"
        ) from None


def build_constraint(request: GenerationRequest) -> Constraint | None:
    tools = request.tools
    mode = request.tool_choice.mode
    if tools and mode is not ToolChoiceMode.NONE:
        chosen = tools
        if mode is ToolChoiceMode.FUNCTION:
            chosen = tuple(t for t in tools if t.name == request.tool_choice.function_name)
            if not chosen:
                raise InvalidRequestError(
                    f"tool_choice names '{request.tool_choice.function_name}', which is not among the tools.",
                    param="tool_choice",
                )
        grammar = _schema_gbnf(call_schema(chosen), "tools")
        if mode is ToolChoiceMode.AUTO:
            grammar = grammar.replace("root ::=", "call ::=", 1) + "root ::= call | text\n" + _TEXT_RULES
            return Constraint(grammar, "auto")
        return Constraint(grammar, "required")
    fmt = request.response_format
    if fmt.type is ResponseFormatType.JSON_OBJECT:
        return Constraint(JSON_GBNF, "")
    if fmt.type is ResponseFormatType.JSON_SCHEMA:
        try:
            schema = json.loads(fmt.json_schema)
        except ValueError:
            raise InvalidRequestError(
                "response_format.json_schema.schema is not valid JSON.", param="response_format"
            ) from None
        return Constraint(_schema_gbnf(schema, "response_format"), "")
    return None
