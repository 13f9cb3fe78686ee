"""Record the TensorRT-LLM API surface ARK uses, from the installed package, as JSON.

Run inside the GPU image (where the real `tensorrt_llm` is installed), from the repository root:

    python deploy/gpu/record_trtllm_api.py tests/support/trtllm_api.json

The result pins what ARK may call: the CPU test suite builds a stub `tensorrt_llm` from this file
(tests/support/trtllm_stub) that refuses any keyword or attribute not recorded here, so a mapping that would fail
on the real release fails on CPU too. Only introspection is used (signatures, pydantic fields, dataclass fields,
pybind11 docstrings, the `self.x = ...` assignments of a class's methods); nothing is executed on a GPU.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import json
import re
import sys
import textwrap
import typing
from pathlib import Path
from typing import Any

DEFAULT_OUTPUT = "tests/support/trtllm_api.json"

# What ARK uses: "module:Name" → how to read it. `exported_from` lists the other modules ARK imports it from.
SPEC: dict[str, dict[str, Any]] = {
    "tensorrt_llm.llmapi:LLM": {
        "kind": "class",
        "exported_from": ["tensorrt_llm"],
        "init_kwargs_model": "tensorrt_llm.llmapi:TorchLlmArgs",
        "methods": ["generate_async", "shutdown"],
        "attributes": ["tokenizer"],
    },
    "tensorrt_llm.llmapi:TorchLlmArgs": {"kind": "model"},
    "tensorrt_llm.llmapi:KvCacheConfig": {"kind": "model"},
    "tensorrt_llm.sampling_params:SamplingParams": {
        "kind": "dataclass",
        "exported_from": ["tensorrt_llm", "tensorrt_llm.llmapi"],
    },
    "tensorrt_llm.sampling_params:GuidedDecodingParams": {
        "kind": "dataclass",
        "exported_from": ["tensorrt_llm.llmapi"],
    },
    "tensorrt_llm.sampling_params:LogitsProcessor": {
        "kind": "abstract",
        "exported_from": ["tensorrt_llm.llmapi"],
        "methods": ["__call__"],
    },
    "tensorrt_llm.bindings.executor:KvCacheRetentionConfig": {
        "kind": "class",
        "exported_from": ["tensorrt_llm.llmapi"],
        "nested": ["TokenRangeRetentionConfig"],
    },
    "tensorrt_llm.executor.result:Logprob": {"kind": "dataclass"},  # @dataclass(slots=True) in every 1.x
    "tensorrt_llm.executor.result:CompletionOutput": {"kind": "dataclass", "exported_from": ["tensorrt_llm.llmapi"]},
    "tensorrt_llm.llmapi:RequestOutput": {
        "kind": "class",
        "methods": ["abort", "aresult", "result"],
        "async_iterable": True,
    },
    "tensorrt_llm.runtime:ModelRunnerCpp": {"kind": "class", "methods": ["from_dir", "generate"]},
    # The embeddings engine's BERT runtime (services/embeddings/engines/tensorrt_llm.py).
    "tensorrt_llm.runtime:Session": {"kind": "class", "methods": ["from_serialized_engine", "infer_shapes", "run"]},
    "tensorrt_llm.runtime:TensorInfo": {"kind": "dataclass"},
}

_KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: "positional_only",
    inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional_or_keyword",
    inspect.Parameter.KEYWORD_ONLY: "keyword_only",
    inspect.Parameter.VAR_POSITIONAL: "var_positional",
    inspect.Parameter.VAR_KEYWORD: "var_keyword",
}
_VAR = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _load(qualified: str) -> Any:
    module, name = qualified.split(":")
    return getattr(importlib.import_module(module), name)


def _params(func: Any) -> list[dict[str, Any]]:
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return _pybind_params(func)
    return [
        {"name": p.name, "kind": _KINDS[p.kind], "required": p.default is p.empty and p.kind not in _VAR}
        for p in signature.parameters.values()
        if p.name != "self"
    ]


def _pybind_params(func: Any) -> list[dict[str, Any]]:
    """pybind11 functions have no signature object; their docstring's first line is `name(self: T, a: U = d, ...)`."""
    first = (func.__doc__ or "").strip().splitlines()[0]
    inside = first[first.index("(") + 1 : first.rindex(")")]
    params, depth, current = [], 0, ""
    for char in inside + ",":
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            params.append(current.strip())
            current = ""
        else:
            current += char
    out = []
    for text in filter(None, params):
        name = re.split(r"[:=]", text, maxsplit=1)[0].strip()
        if name not in ("self", "*args", "**kwargs"):
            out.append({"name": name, "kind": "positional_or_keyword", "required": "=" not in text})
    return out


def _literal_choices(annotation: Any) -> list[Any] | None:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return list(args)
    choices = [c for a in args for c in (_literal_choices(a) or [])]
    if choices and type(None) in args:
        choices.append(None)
    return choices or None


def _model_fields(cls: Any) -> tuple[dict[str, Any], list[str]]:
    fields, deprecated = {}, []
    for name, info in cls.model_fields.items():
        entry: dict[str, Any] = {"required": info.is_required()}
        if not info.is_required() and isinstance(info.default, bool | int | float | str):
            entry["default"] = info.default  # what the release does when ARK leaves it unset
        if choices := _literal_choices(info.annotation):
            entry["choices"] = choices
        fields[name] = entry
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if extra.get("status") == "deprecated":
            deprecated.append(name)
    return dict(sorted(fields.items())), deprecated


def _dataclass_fields(cls: Any) -> dict[str, Any]:
    missing = dataclasses.MISSING
    return {
        f.name: {"required": f.default is missing and f.default_factory is missing}
        for f in sorted(dataclasses.fields(cls), key=lambda f: f.name)
        if f.init and not f.name.startswith("_")
    }


def _assigned_attributes(cls: Any) -> set[str]:
    """Public attributes set as `self.name = ...` in the methods of `cls` and its bases (instance attributes)."""
    names: set[str] = set()
    for klass in inspect.getmro(cls):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        for node in ast.walk(tree):
            stored = isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
            on_self = stored and isinstance(node.value, ast.Name) and node.value.id == "self"
            if on_self and not node.attr.startswith("_"):
                names.add(node.attr)
    return names


def _public_attributes(cls: Any) -> list[str]:
    declared = {n for n in dir(cls) if not n.startswith("_") and not inspect.isroutine(getattr(cls, n, None))}
    return sorted(declared | _assigned_attributes(cls))


def _record(obj: Any, spec: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {key: spec[key] for key in ("exported_from", "init_kwargs_model") if key in spec}
    kind = spec["kind"]
    entry["kind"] = kind
    if kind == "model":
        entry["fields"], deprecated = _model_fields(obj)
        if deprecated:
            entry["deprecated"] = deprecated
    elif kind == "dataclass":
        entry["fields"] = _dataclass_fields(obj)
        init = _params(obj.__init__)
        if any(p["kind"] == "positional_or_keyword" for p in init):
            entry["init"] = init  # not kw_only: positional arguments bind in this order
    elif kind == "class":
        entry["init"] = _params(obj.__init__)
    if kind in ("class", "dataclass"):
        attributes = _public_attributes(obj)
        if kind == "dataclass":
            attributes = [a for a in attributes if a not in entry["fields"]]
        entry["attributes"] = attributes
    if "methods" in spec:
        entry["methods"] = {name: _params(getattr(obj, name)) for name in spec["methods"]}
    if spec.get("async_iterable"):
        entry["async_iterable"] = hasattr(obj, "__aiter__")
    if "nested" in spec:
        entry["nested"] = {name: _record(getattr(obj, name), {"kind": "class"}) for name in spec["nested"]}
    return entry


def _keep_accepts(symbols: dict[str, Any], previous: dict[str, Any]) -> None:
    """Carry over the names a `**kwargs` is read for (`accepts`): introspection cannot see them, the source can."""
    for name, symbol in symbols.items():
        for method, params in symbol.get("methods", {}).items():
            old = previous.get(name, {}).get("methods", {}).get(method, [])
            accepts = next((p["accepts"] for p in old if p["kind"] == "var_keyword" and "accepts" in p), None)
            for param in params:
                if param["kind"] == "var_keyword" and accepts is not None:
                    param["accepts"] = accepts


def record(previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON document for the installed release (`previous`: the committed one, for `accepts`)."""
    symbols = {name: _record(_load(name), spec) for name, spec in SPEC.items()}
    _keep_accepts(symbols, (previous or {}).get("symbols", {}))
    return {
        "package": "tensorrt-llm",
        "version": importlib.import_module("tensorrt_llm").__version__,
        "produced_by": "deploy/gpu/record_trtllm_api.py, by introspection of the installed package",
        "regenerate": f"python deploy/gpu/record_trtllm_api.py {DEFAULT_OUTPUT}",
        "symbols": symbols,
    }


if __name__ == "__main__":
    # The file is read before it is rewritten: its `accepts` lists are carried over.
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / DEFAULT_OUTPUT
    previous = json.loads(target.read_text()) if target.is_file() else None
    target.write_text(json.dumps(record(previous), indent=1) + "\n")
    print(f"wrote {target}")
