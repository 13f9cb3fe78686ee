"""Validate ARK's HTTP payloads against OpenAI's own OpenAPI document.

"OpenAI-compatible" is checked against the source of truth (openai/openai-openapi), not against our own models,
so a field we forget or mistype shows up as a test failure instead of a client-side surprise.

The document lives beside the checkout (``../shared/openai/openapi.yaml``) and is deliberately not vendored into
this repository; tests that need it are marked with :data:`require_spec` and skip when it is absent.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

__all__ = ["SPEC_PATH", "load_spec", "require_spec", "spec_available", "validate", "validator_for"]

# tests/support/openapi.py -> parents[2] is the project root; the shared document sits next to it, not inside it.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
SPEC_PATH = PROJECT_ROOT.parent / "shared" / "openai" / "openapi.yaml"

# The whole document is registered under this URI so that its internal "#/components/schemas/..." refs resolve.
_SPEC_URI = "urn:openai:openapi.yaml"

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the file is ~3 MB: the C loader is several times faster


def spec_available() -> bool:
    """Whether the shared OpenAPI document is present (it is outside the repo, so CI checkouts may lack it)."""
    return SPEC_PATH.is_file()


require_spec = pytest.mark.skipif(
    not spec_available(),
    reason="../shared/openai/openapi.yaml is absent (it lives beside the checkout, not in it)",
)


def _denullable(node: Any) -> Any:
    """Return a copy of ``node`` with OpenAPI 3.0 ``nullable: true`` turned into JSON Schema 2020-12.

    The document declares OpenAPI 3.1 (i.e. JSON Schema 2020-12) yet still marks nullable fields the 3.0 way, a
    keyword a JSON Schema validator ignores; left alone, every ``null`` OpenAI itself sends (``finish_reason`` in
    stream chunks, ``logprobs``, ``usage``...) would be reported as an error. Rewrite, as ../shared/openai/README.md
    says: ``type: X`` -> ``[X, "null"]``; an ``enum`` gains ``None``; a typeless node (``$ref``/``anyOf``/``oneOf``)
    -> ``anyOf: [node, {type: null}]``. Building a copy (instead of mutating) keeps YAML aliases safe.

    Known gap, left as the README describes it: a bare ``{nullable: true}`` branch inside an ``allOf`` (Assistants
    and Uploads schemas only) becomes ``anyOf: [{}, null]``, which does not make the enclosing ``allOf`` nullable.
    """
    if isinstance(node, list):
        return [_denullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    nullable = node.get("nullable")
    out = {
        key: _denullable(value) for key, value in node.items() if not (key == "nullable" and isinstance(nullable, bool))
    }
    if nullable is not True:
        return out
    if "type" not in out:
        return {"anyOf": [out, {"type": "null"}]}
    types = out["type"] if isinstance(out["type"], list) else [out["type"]]
    out["type"] = types if "null" in types else [*types, "null"]
    if "enum" in out and None not in out["enum"]:
        out["enum"] = [*out["enum"], None]
    return out


@functools.cache
def load_spec() -> dict[str, Any]:
    """Parse the document once per test session (~1-2 s) and return it with ``nullable`` rewritten."""
    with SPEC_PATH.open("rb") as fh:
        return _denullable(yaml.load(fh, Loader=_Loader))


@functools.cache
def _registry() -> Registry:
    """A registry holding the whole document, so refs anywhere in it resolve against it."""
    return Registry().with_resource(_SPEC_URI, Resource.from_contents(load_spec(), default_specification=DRAFT202012))


@functools.cache
def validator_for(schema_name: str) -> Draft202012Validator:
    """A cached validator for ``#/components/schemas/<schema_name>``; a typo in the name fails loudly."""
    if schema_name not in load_spec()["components"]["schemas"]:
        raise KeyError(f"no schema {schema_name!r} in {SPEC_PATH}")
    return Draft202012Validator({"$ref": f"{_SPEC_URI}#/components/schemas/{schema_name}"}, registry=_registry())


def validate(schema_name: str, instance: Any) -> None:
    """Fail with every violation listed (not just the first) when ``instance`` is not a valid ``schema_name``."""
    errors = sorted(validator_for(schema_name).iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  at {'/'.join(map(str, e.absolute_path)) or '<root>'}: {_shorten(e.message)}" for e in errors]
        raise AssertionError(f"{len(errors)} error(s) validating against {schema_name}:\n" + "\n".join(lines))


def _shorten(message: str, limit: int = 400) -> str:
    """jsonschema messages embed the offending instance, which can be a whole response: keep reports readable."""
    return message if len(message) <= limit else message[: limit - 3] + "..."
