"""Output constraints for JSON mode, JSON Schema outputs and tool calls, on llguidance.

A request's `response_format`, `tools` and `tool_choice` become one grammar (services.chat.grammar.lark). On the way:

1. The schema is checked in pure Python against what the constraint engine enforces and the configured limits
   (services.chat.grammar.schema_check): a keyword that cannot be enforced, a remote `$ref`, a bound out of range
   or an oversized schema is a 400 naming it, in milliseconds.
2. A grammar not seen before is compiled in a child process bounded in time and memory
   (services.chat.grammar.compile_worker): nothing a client sends can stall or crash the chat worker.
3. The compiled matcher is kept in an LRU cache keyed by the grammar's hash; each generated sequence gets a fresh
   copy of it (`Constraint.matcher()`).

Engines that apply grammars themselves (TensorRT-LLM) read `Constraint.grammar` (llguidance's Lark dialect: pass
it as `GuidedDecodingParams(grammar=...)` with `guided_decoding_backend="llguidance"`) and never ask for a matcher.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from services.chat.domain import GenerationRequest, ResponseFormatType, Tool, ToolChoiceMode
from services.chat.grammar.compile_worker import CompileRefused, CompileWorker, ParserLimits
from services.chat.grammar.lark import (
    TEXT_ANSWER,
    json_answer,
    json_schema_grammar,
    no_call_grammar,
    tool_calls_grammar,
)
from services.chat.grammar.schema_check import SchemaLimits, check_schema
from services.common.config import StructuredOutputLimits
from services.common.errors import InvalidRequestError

log = logging.getLogger(__name__)


class ToolCallMode(StrEnum):
    NONE = ""  # no tools: the output is text or JSON
    REQUIRED = "required"  # the output is one or more calls
    AUTO = "auto"  # the output is calls or plain text


@dataclass(frozen=True, slots=True)
class Constraint:
    """The grammar one request's output must follow, and a source of per-sequence matchers for it."""

    grammar: str  # llguidance Lark text
    tool_call: ToolCallMode = ToolCallMode.NONE
    max_calls: int = 1
    _template: Any = None  # a compiled llguidance.LLMatcher in its initial state (None: engine-applied grammar)
    _n_vocab: int = 0

    def matcher(self) -> Any:
        """A fresh matcher for one generated sequence (services.chat.grammar.matcher.TokenMatcher)."""
        from services.chat.grammar.matcher import TokenMatcher

        if self._template is None:
            raise RuntimeError("this constraint is applied by the engine; it has no token matcher")
        return TokenMatcher(self._template.deep_copy(), self._n_vocab)


@dataclass(frozen=True, slots=True)
class _Spec:
    grammar: str
    tool_call: ToolCallMode
    max_calls: int
    param: str


def _limits(config: StructuredOutputLimits) -> SchemaLimits:
    return SchemaLimits(
        max_schema_bytes=config.max_schema_bytes,
        max_depth=config.max_depth,
        max_properties=config.max_properties,
        max_enum_values=config.max_enum_values,
        max_length_bound=config.max_length_bound,
        max_items_bound=config.max_items_bound,
        max_pattern_length=config.max_pattern_length,
        max_repetition=config.max_repetition,
    )


def _parse(text: str, limits: SchemaLimits, *, param: str, where: str) -> Any:
    if len(text.encode()) > limits.max_schema_bytes:
        raise InvalidRequestError(
            f"Invalid schema for '{where}': {len(text.encode())} bytes; ARK allows at most {limits.max_schema_bytes}.",
            param=param,
            code="schema_too_complex",
        )
    try:
        schema = json.loads(text) if text else {}
    except RecursionError:
        raise InvalidRequestError(
            f"Invalid schema for '{where}': it nests deeper than {limits.max_depth} levels.",
            param=param,
            code="schema_too_complex",
        ) from None
    except ValueError:
        raise InvalidRequestError(f"Invalid schema for '{where}': not valid JSON.", param=param) from None
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"Invalid schema for '{where}': it must be a JSON object.", param=param)
    check_schema(schema, limits, param=param, where=where)
    return schema


_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")


def _closed(schema: Any) -> Any:
    """`schema` with `additionalProperties: false` wherever an object lists its properties and says nothing else.

    A function takes the arguments it declares: an undeclared one would fail the client's call. Small models also
    tend to continue an arguments object with made-up keys when the schema leaves it open.
    """
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: _closed(sub) for name, sub in out[key].items()}
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_closed(sub) for sub in out[key]]
    if "items" in out:
        out["items"] = _closed(out["items"])
    return out


def _arguments_schema(tool: Tool, index: int, limits: SchemaLimits) -> dict[str, Any]:
    where = f"tools[{index}].function.parameters"
    schema = _closed(_parse(tool.parameters_json, limits, param=where, where=where) or {})
    kind = schema.get("type")
    if kind is None and not any(k in schema for k in ("$ref", "anyOf", "oneOf", "allOf")):
        schema = {**schema, "type": "object"}
    elif kind is not None and kind != "object":
        raise InvalidRequestError(
            f"Invalid schema for '{where}': a function's parameters must be an object schema (got type {kind!r}).",
            param=where,
        )
    return schema


def _answer_schema(request: GenerationRequest, limits: SchemaLimits) -> dict[str, Any] | None:
    """The JSON Schema a non-call answer must follow (`response_format`), or None for free text."""
    fmt = request.response_format
    if fmt.type is ResponseFormatType.JSON_OBJECT:
        return {"type": "object"}
    if fmt.type is ResponseFormatType.JSON_SCHEMA:
        where = "response_format.json_schema.schema"
        # Closed like tool arguments: an application parses the fields it declared, and an open object lets a
        # small model run on with made-up keys until max_tokens cuts the JSON.
        return _closed(_parse(fmt.json_schema, limits, param="response_format", where=where))
    return None


def _callable(request: GenerationRequest) -> list[tuple[int, Tool]]:
    """The tools the model may call (with their index in `tools`): all, the named one, or the allowed ones."""
    choice = request.tool_choice
    chosen = list(enumerate(request.tools))
    if choice.mode is ToolChoiceMode.FUNCTION:
        chosen = [(i, t) for i, t in chosen if t.name == choice.function_name]
        if not chosen:
            raise InvalidRequestError(
                f"tool_choice names '{choice.function_name[:64]}', which is not among the tools.", param="tool_choice"
            )
    elif choice.allowed:
        chosen = [(i, t) for i, t in chosen if t.name in choice.allowed]
        if not chosen:
            raise InvalidRequestError(
                "tool_choice.allowed_tools names none of the request's function tools.", param="tool_choice"
            )
    return chosen


def constraint_spec(request: GenerationRequest, config: StructuredOutputLimits) -> _Spec | None:
    """The grammar a request asks for, after every check that needs no compiling (raises InvalidRequestError).

    Every tool of the request stays in the prompt whatever `tool_choice` says (the prompt of a conversation's turns
    must not change with it, or the turns stop sharing their prefix): `tool_choice` acts here only, on what the
    output may be — no call ("none"), calls of the allowed or named functions only, a call required or not.
    """
    limits = _limits(config)
    schema = _answer_schema(request, limits)
    mode = request.tool_choice.mode
    if request.tools and mode is not ToolChoiceMode.NONE:
        chosen = _callable(request)
        total = sum(len(t.parameters_json.encode()) for _, t in chosen)
        if total > limits.max_schema_bytes:
            raise InvalidRequestError(
                f"The tools' parameter schemas add up to {total} bytes; ARK allows at most {limits.max_schema_bytes}.",
                param="tools",
                code="schema_too_complex",
            )
        schemas = [(t.name, _arguments_schema(t, i, limits)) for i, t in chosen]
        # A named tool_choice forces exactly one call of that function, as OpenAI does: parallel calls of it would
        # repeat the call until max_tokens cuts the last one.
        parallel = request.parallel_tool_calls and mode is not ToolChoiceMode.FUNCTION
        max_calls = config.max_parallel_tool_calls if parallel else 1
        if mode is ToolChoiceMode.AUTO:
            answer = TEXT_ANSWER if schema is None else json_answer(schema)
            grammar = tool_calls_grammar(schemas, max_calls=max_calls, answer=answer)
            return _Spec(grammar, ToolCallMode.AUTO, max_calls, "tools")
        grammar = tool_calls_grammar(schemas, max_calls=max_calls, answer=None)
        return _Spec(grammar, ToolCallMode.REQUIRED, max_calls, "tools")
    if schema is not None:
        return _Spec(json_schema_grammar(schema), ToolCallMode.NONE, 0, "response_format")
    if request.tools:
        return _Spec(no_call_grammar(), ToolCallMode.NONE, 0, "tool_choice")
    return None


class ConstraintCompiler:
    """Turns requests into compiled constraints for one model's vocabulary, with a bounded cache.

    `gguf_path` names the model whose vocabulary the grammars are compiled against (llama.cpp engines); None
    compiles without a vocabulary, for engines that apply the grammar themselves.
    """

    def __init__(self, config: StructuredOutputLimits, *, gguf_path: str | None) -> None:
        self._config = config
        self._parser_limits = ParserLimits(config.max_grammar_states, config.max_grammar_symbols)
        self._worker = CompileWorker(
            gguf_path,
            self._parser_limits,
            timeout_seconds=config.compile_timeout_seconds,
            memory_bytes=config.compile_memory_mb * 1024 * 1024,
        )
        self._tokenizer: Any = None
        self._n_vocab = 0
        if gguf_path is not None:
            from services.chat.grammar.matcher import tokenizer_from_gguf

            self._worker.start()
            self._tokenizer = tokenizer_from_gguf(gguf_path)
            self._n_vocab = self._tokenizer.vocab_size
        self._cache: OrderedDict[str, Constraint] = OrderedDict()

    async def build(self, request: GenerationRequest) -> Constraint | None:
        """The request's constraint, compiled (or from the cache); raises InvalidRequestError for a bad one."""
        spec = constraint_spec(request, self._config)
        if spec is None:
            return None
        import llguidance

        key = hashlib.sha256(spec.grammar.encode()).hexdigest()
        cached = self._cache.get(key)
        if cached is None:
            grammar = llguidance.LLMatcher.grammar_from_lark(spec.grammar)
            try:
                seconds = await self._worker.compile(grammar)
            except CompileRefused as exc:
                raise InvalidRequestError(
                    f"Invalid value for '{spec.param}': ARK cannot compile this output constraint: {str(exc)[:512]}",
                    param=spec.param,
                    code="invalid_schema",
                ) from None
            log.debug("grammar %s compiled in %.1f ms", key[:12], seconds * 1000)
            template = None
            if self._tokenizer is not None:
                # Known to build within the bounds (the child just did); off the event loop all the same.
                template = await asyncio.to_thread(
                    llguidance.LLMatcher,
                    self._tokenizer,
                    grammar,
                    log_level=0,
                    limits=self._parser_limits.llguidance(),
                )
            cached = Constraint(spec.grammar, _template=template, _n_vocab=self._n_vocab)
            self._cache[key] = cached
            while len(self._cache) > self._config.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return Constraint(spec.grammar, spec.tool_call, spec.max_calls, cached._template, cached._n_vocab)

    def close(self) -> None:
        self._worker.close()
