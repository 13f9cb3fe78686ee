"""Checks a JSON Schema against what the constraint engine enforces and against the configured limits.

Runs in the request path before anything is compiled, in pure Python over the parsed schema, so a hostile schema
(a length bound of 100,000, an enum of 100,000 strings, arrays nested 100 deep, a remote `$ref`) is a 400 naming
the keyword within milliseconds instead of reaching the compiler. Keywords the engine cannot enforce are refused by
name: a client that asked for a constraint never gets output that silently ignores part of it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from services.common.errors import InvalidRequestError

# What llguidance enforces (its JSON Schema converter: Draft 2020-12 subset), keyword by keyword.
ENFORCED = frozenset(
    {
        "type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref",
        "properties", "required", "additionalProperties",
        "items", "prefixItems", "minItems", "maxItems",
        "minLength", "maxLength", "pattern", "format",
        "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
    }
)  # fmt: skip
# Annotations that never constrain the output (and definitions, which are reached through `$ref`).
ANNOTATIONS = frozenset(
    {
        "$schema", "$id", "$anchor", "$comment", "$defs", "definitions", "title", "description", "default",
        "examples", "deprecated", "readOnly", "writeOnly", "strict", "discriminator", "nullable",
    }
)  # fmt: skip
FORMATS = frozenset({"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid"})
TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})

_SCHEMA_MAPS = ("properties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties")
_COUNTED = re.compile(r"\{(\d+)(?:,(\d*))?\}")


@dataclass(frozen=True, slots=True)
class SchemaLimits:
    """The bounds a schema must stay within (from `limits.structured_output` in the configuration)."""

    max_schema_bytes: int = 65536
    max_depth: int = 32
    max_properties: int = 5000
    max_enum_values: int = 1000
    max_length_bound: int = 10000
    max_items_bound: int = 256
    max_pattern_length: int = 1000
    max_repetition: int = 1000


class _Checker:
    def __init__(self, root: Any, limits: SchemaLimits, param: str, where: str) -> None:
        self.root = root
        self.limits = limits
        self.param = param
        self.where = where
        self.properties = 0
        self.enum_values = 0

    def fail(self, path: str, message: str, code: str = "invalid_schema") -> None:
        raise InvalidRequestError(
            f"Invalid schema for '{self.where}' at '#{path}': {message}", param=self.param, code=code
        )

    def walk(self, node: Any, path: str, depth: int) -> None:
        if isinstance(node, bool):
            return
        if not isinstance(node, dict):
            self.fail(path, "a schema must be an object or a boolean.")
        if depth > self.limits.max_depth:
            self.fail(path, f"schemas nest deeper than {self.limits.max_depth} levels.", "schema_too_complex")
        unknown = sorted(k for k in node if k not in ENFORCED and k not in ANNOTATIONS)
        if unknown:
            names = ", ".join(f"'{k}'" for k in unknown[:5])
            self.fail(path, f"ARK cannot enforce {names}; remove it or express it with supported keywords.",
                      "unsupported_schema_keyword")  # fmt: skip
        self._type(node, path)
        self._values(node, path)
        self._numbers(node, path)
        self._lengths(node, path)
        self._pattern(node, path)
        self._format(node, path)
        self._ref(node, path)
        self._object(node, path)
        for key in _SCHEMA_MAPS:
            value = node.get(key)
            if value is None:
                continue
            if not isinstance(value, dict):
                self.fail(f"{path}/{key}", f"'{key}' must be an object.")
            if key == "properties":
                self.properties += len(value)
                if self.properties > self.limits.max_properties:
                    self.fail(path, f"more than {self.limits.max_properties} properties in total.",
                              "schema_too_complex")  # fmt: skip
            for name, sub in value.items():
                self.walk(sub, f"{path}/{key}/{name}", depth + 1)
        for key in _SCHEMA_LISTS:
            value = node.get(key)
            if value is None:
                continue
            if not isinstance(value, list) or (key != "prefixItems" and not value):
                self.fail(f"{path}/{key}", f"'{key}' must be a non-empty array of schemas.")
            for i, sub in enumerate(value):
                self.walk(sub, f"{path}/{key}/{i}", depth + 1)
        for key in _SCHEMA_VALUES:
            if key in node:
                self.walk(node[key], f"{path}/{key}", depth + 1)

    def _type(self, node: dict, path: str) -> None:
        kind = node.get("type")
        if kind is None:
            return
        kinds = kind if isinstance(kind, list) else [kind]
        if not kinds or any(not isinstance(k, str) or k not in TYPES for k in kinds):
            self.fail(f"{path}/type", f"'type' must be one of {sorted(TYPES)} or an array of them.")

    def _values(self, node: dict, path: str) -> None:
        if "enum" in node:
            enum = node["enum"]
            if not isinstance(enum, list) or not enum:
                self.fail(f"{path}/enum", "'enum' must be a non-empty array.")
            self.enum_values += len(enum)
            if self.enum_values > self.limits.max_enum_values:
                self.fail(f"{path}/enum", f"more than {self.limits.max_enum_values} enum values in total.",
                          "schema_too_complex")  # fmt: skip

    def _numbers(self, node: dict, path: str) -> None:
        bounds = {}
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"):
            if key in node:
                value = node[key]
                if isinstance(value, bool) or not isinstance(value, int | float):
                    self.fail(f"{path}/{key}", f"'{key}' must be a number.")
                bounds[key] = value
        if "multipleOf" in bounds and bounds["multipleOf"] <= 0:
            self.fail(f"{path}/multipleOf", "'multipleOf' must be greater than 0.")
        low = [bounds[k] for k in ("minimum", "exclusiveMinimum") if k in bounds]
        high = [bounds[k] for k in ("maximum", "exclusiveMaximum") if k in bounds]
        if low and high and max(low) > min(high):
            self.fail(path, f"the lower bound {max(low)} is greater than the upper bound {min(high)}.")
        exclusive = "exclusiveMinimum" in bounds or "exclusiveMaximum" in bounds
        if low and high and exclusive and max(low) == min(high):
            self.fail(path, f"no number lies between the bounds ({max(low)}).")

    def _lengths(self, node: dict, path: str) -> None:
        for low_key, high_key, bound in (
            ("minLength", "maxLength", self.limits.max_length_bound),
            ("minItems", "maxItems", self.limits.max_items_bound),
        ):
            values = {}
            for key in (low_key, high_key):
                if key not in node:
                    continue
                value = node[key]
                if isinstance(value, bool) or not isinstance(value, int):
                    self.fail(f"{path}/{key}", f"'{key}' must be a non-negative integer.")
                if value < 0:
                    self.fail(f"{path}/{key}", f"'{key}' must not be negative (got {value}).")
                if value > bound:
                    self.fail(f"{path}/{key}", f"'{key}' is {value}; ARK allows at most {bound}.",
                              "schema_too_complex")  # fmt: skip
                values[key] = value
            if len(values) == 2 and values[low_key] > values[high_key]:
                self.fail(path, f"'{low_key}' ({values[low_key]}) is greater than '{high_key}' ({values[high_key]}).")

    def _pattern(self, node: dict, path: str) -> None:
        if "pattern" not in node:
            return
        pattern = node["pattern"]
        if not isinstance(pattern, str):
            self.fail(f"{path}/pattern", "'pattern' must be a string.")
        if len(pattern) > self.limits.max_pattern_length:
            self.fail(f"{path}/pattern", f"the pattern is {len(pattern)} characters; ARK allows at most "
                      f"{self.limits.max_pattern_length}.", "schema_too_complex")  # fmt: skip
        for match in _COUNTED.finditer(pattern):
            counts = [int(g) for g in match.groups() if g]
            if max(counts) > self.limits.max_repetition:
                self.fail(f"{path}/pattern", f"the repetition {match.group(0)} exceeds {self.limits.max_repetition}.",
                          "schema_too_complex")  # fmt: skip
            if len(counts) == 2 and counts[0] > counts[1]:
                self.fail(f"{path}/pattern", f"the repetition {match.group(0)} has its minimum above its maximum.")

    def _format(self, node: dict, path: str) -> None:
        if "format" in node and node["format"] not in FORMATS:
            self.fail(f"{path}/format", f"ARK cannot enforce the format {str(node['format'])[:64]!r}; supported: "
                      f"{', '.join(sorted(FORMATS))}.", "unsupported_schema_keyword")  # fmt: skip

    def _ref(self, node: dict, path: str) -> None:
        if "$ref" not in node:
            return
        ref = node["$ref"]
        if not isinstance(ref, str) or not ref.startswith("#"):
            self.fail(f"{path}/$ref", "only local references ('#/...') are allowed; remote references are refused.")
        target: Any = self.root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                self.fail(f"{path}/$ref", f"the reference {ref[:128]!r} does not resolve within the schema.")

    def _object(self, node: dict, path: str) -> None:
        required = node.get("required")
        if required is not None and (not isinstance(required, list) or not all(isinstance(r, str) for r in required)):
            self.fail(f"{path}/required", "'required' must be an array of property names.")


def check_schema(schema: Any, limits: SchemaLimits, *, param: str, where: str) -> int:
    """Raise InvalidRequestError naming the keyword if `schema` is outside what ARK enforces or allows.

    `param` is the request parameter reported to the client, `where` the place of the schema in the request.
    Returns the schema's size in bytes (compact JSON), for limits that add up several schemas.
    """
    size = len(json.dumps(schema, separators=(",", ":")).encode())
    if size > limits.max_schema_bytes:
        raise InvalidRequestError(
            f"Invalid schema for '{where}': {size} bytes; ARK allows at most {limits.max_schema_bytes}.",
            param=param,
            code="schema_too_complex",
        )
    _Checker(schema, limits, param, where).walk(schema, "", 0)
    return size
