"""Validate ARK's HTTP payloads and request tables against OpenAI's own definitions.

"OpenAI-compatible" is checked against OpenAI's sources, not against our own models, so a field we forget or mistype
shows up as a test failure instead of a client-side surprise. Two sources, one entry point per job:

- the installed `openai` package's types (tests.support.openai_types), in every checkout: the official client is
  pinned in pyproject's dev extra, so a clone with nothing beside it validates every payload too;
- OpenAI's OpenAPI document, ``../shared/openai/openapi.yaml`` beside the checkout (deliberately not vendored into
  this repository), as JSON Schema, wherever it is present.

:func:`validate` checks a payload against both (the document when present); :func:`request_fields` reads a request's
fields from the document when present, else from the package's TypedDicts (tests check the two agree).
"""

from __future__ import annotations

import functools
from collections.abc import Collection
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from tests.support import openai_types

__all__ = ["SPEC_PATH", "load_spec", "request_fields", "spec_available", "validate", "validator_for"]

# tests/support/openapi.py -> parents[2] is the project root; the shared document sits next to it, not inside it.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
SPEC_PATH = PROJECT_ROOT.parent / "shared" / "openai" / "openapi.yaml"

# The whole document is registered under this URI so that its internal "#/components/schemas/..." refs resolve.
_SPEC_URI = "urn:openai:openapi.yaml"

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the file is ~3 MB: the C loader is several times faster


def spec_available() -> bool:
    """Whether the shared OpenAPI document is present (it is outside the repo, so CI checkouts may lack it)."""
    return SPEC_PATH.is_file()


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
def load_spec(path: Path = SPEC_PATH) -> dict[str, Any]:
    """Parse the document once per test session (~1-2 s) and return it with ``nullable`` rewritten.

    ``path`` is another OpenAPI document of the same form (the suite's own tests of this module use a small one)."""
    with path.open("rb") as fh:
        return _denullable(yaml.load(fh, Loader=_Loader))


@functools.cache
def _registry(path: Path) -> Registry:
    """A registry holding the whole document, so refs anywhere in it resolve against it."""
    return Registry().with_resource(
        _SPEC_URI, Resource.from_contents(load_spec(path), default_specification=DRAFT202012)
    )


@functools.cache
def validator_for(schema_name: str, path: Path = SPEC_PATH) -> Draft202012Validator:
    """A cached validator for ``#/components/schemas/<schema_name>``; a typo in the name fails loudly."""
    if schema_name not in load_spec(path)["components"]["schemas"]:
        raise KeyError(f"no schema {schema_name!r} in {path}")
    return Draft202012Validator({"$ref": f"{_SPEC_URI}#/components/schemas/{schema_name}"}, registry=_registry(path))


def validate(schema_name: str, instance: Any, *, extensions: Collection[str] = ()) -> None:
    """Fail with every violation listed when ``instance`` is not a valid ``schema_name``: against the openai
    package's type always (strictly; ``extensions`` names ARK's own added fields, see openai_types.validate), and
    against the OpenAPI document's schema too where the document is present."""
    openai_types.validate(schema_name, instance, extensions=extensions)
    if spec_available():
        validate_against_spec(schema_name, instance)


def validate_against_spec(schema_name: str, instance: Any, path: Path = SPEC_PATH) -> None:
    """Fail with every violation listed when ``instance`` is not valid against the document's ``schema_name``."""
    errors = sorted(validator_for(schema_name, path).iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  at {'/'.join(map(str, e.absolute_path)) or '<root>'}: {_shorten(e.message)}" for e in errors]
        raise AssertionError(f"{len(errors)} error(s) validating against {schema_name}:\n" + "\n".join(lines))


def spec_request_fields(schema_name: str) -> set[str]:
    """A request schema's properties in the document, following `$ref`s and `allOf`s."""
    schemas = load_spec()["components"]["schemas"]
    found: set[str] = set()

    def walk(node: dict[str, Any]) -> None:
        if "$ref" in node:
            walk(schemas[node["$ref"].rsplit("/", 1)[1]])
            return
        found.update(node.get("properties", {}))
        for sub in node.get("allOf", []):
            walk(sub)

    walk(schemas[schema_name])
    return found


def request_fields(schema_name: str) -> set[str]:
    """The fields OpenAI defines for a request: from the document where present, else from the openai package."""
    return spec_request_fields(schema_name) if spec_available() else openai_types.request_fields(schema_name)


def _shorten(message: str, limit: int = 400) -> str:
    """jsonschema messages embed the offending instance, which can be a whole response: keep reports readable."""
    return message if len(message) <= limit else message[: limit - 3] + "..."
