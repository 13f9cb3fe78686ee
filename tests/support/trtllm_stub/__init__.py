"""A stub `tensorrt_llm` built from the recorded API of the pinned release (tests/support/trtllm_api.json).

Every class ARK uses exists under the module names ARK imports it from, with exactly the recorded parameters and
fields: an unknown keyword, a deprecated one or a value outside a recorded set of choices raises `TypeError` /
`ValueError` as the real package would refuse it, and reading an attribute that was not recorded raises
`AttributeError`. So the TensorRT-LLM engine's mapping is checked on CPU against the release's surface.

Below that surface the stub is a fake model, deterministic and tiny (`FakeModel`): it "generates" tokens from
logits it computes on CPU, applies the request's logits processors to them, keeps a KV-cache of prompts per
`cache_salt` so `cached_tokens` is the real longest common prefix, and records every call for the tests to read.

Where ARK depends on the release's behaviour, the stub does what 1.2's sources do (checked against
`executor/result.py`, `sampling_params.py` at 1.2.0rc2 and `llmapi/llm.py`; docs/architecture.md lists them):
under `n > 1` the PyTorch backend sends one response per sequence and `_handle_sequence` advances the diff of that
sequence only, so the other outputs' `token_ids_diff` still hold their previous tokens; `finish_reason` is set only
when the whole request is final, so a sequence that ends before the others never gets one; the end and stop tokens
the sampler wrote stay in `token_ids` (a stop token is cut when the request is final); `SamplingParams._validate`
refuses greedy sampling with several returns; and without chunked prefill a prompt longer than `max_num_tokens`
fails inside `generate_async`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import os
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

API_PATH = Path(__file__).resolve().parents[1] / "trtllm_api.json"
API: dict[str, Any] = json.loads(API_PATH.read_text())


class RecordedObject:
    """An instance of a recorded class: accepts only the recorded arguments, exposes only recorded attributes."""

    _qualname = ""
    _params: tuple[dict[str, Any], ...] = ()  # parameters in order (classes, and dataclasses that are not kw_only)
    _fields: dict[str, dict[str, Any]] = {}  # keyword fields (pydantic models, dataclasses, kwargs models)
    _keyword_only = True
    _deprecated: frozenset[str] = frozenset()
    _attributes: frozenset[str] = frozenset()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        object.__setattr__(self, "_values", {})
        names = [p["name"] for p in self._params if p["kind"] != "keyword_only"]
        if args and (self._keyword_only or len(args) > len(names)):
            raise TypeError(f"{self._qualname}() takes keyword arguments only, or fewer positional ones")
        bound = dict(zip(names, args, strict=False))
        for name, value in kwargs.items():
            if name in bound:
                raise TypeError(f"{self._qualname}() got multiple values for argument {name!r}")
            bound[name] = value
        allowed = set(names) | set(self._fields)
        for name, value in bound.items():
            if name not in allowed:
                raise TypeError(
                    f"{self._qualname}() got an unexpected keyword argument {name!r} "
                    f"(not in tensorrt-llm {API['version']}'s recorded API)"
                )
            if name in self._deprecated:
                raise TypeError(f"{self._qualname}(): {name!r} is deprecated in tensorrt-llm {API['version']}")
            choices = self._fields.get(name, {}).get("choices")
            if choices is not None and value not in choices:
                raise ValueError(f"{self._qualname}(): {name}={value!r} is not one of {choices}")
        required = [p["name"] for p in self._params if p["required"]]
        required += [n for n, f in self._fields.items() if f["required"]]
        if missing := [n for n in required if n not in bound]:
            raise TypeError(f"{self._qualname}() missing required arguments {missing}")
        self._values.update(bound)

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "_values")
        if name in values:
            return values[name]
        if name in self._fields or name in self._attributes or name in {p["name"] for p in self._params}:
            return self._fields.get(name, {}).get("default")  # recorded, left at its default
        raise AttributeError(f"{self._qualname} has no attribute {name!r} in tensorrt-llm {API['version']}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self._fields and name not in self._attributes and name not in {p["name"] for p in self._params}:
            raise AttributeError(f"{self._qualname} has no attribute {name!r} in tensorrt-llm {API['version']}")
        self._values[name] = value

    def __repr__(self) -> str:
        return f"{self._qualname}({', '.join(f'{k}={v!r}' for k, v in self._values.items())})"


def _recorded_class(qualname: str, spec: dict[str, Any], base: type = RecordedObject) -> type:
    params = tuple(p for p in spec.get("init", []) if p["kind"] != "var_keyword")
    namespace: dict[str, Any] = {
        "_qualname": qualname,
        "_fields": dict(spec.get("fields", {})),
        "_params": params,
        "_keyword_only": not any(p["kind"] != "keyword_only" for p in params),
        "_deprecated": frozenset(spec.get("deprecated", ())),
        "_attributes": frozenset(spec.get("attributes", ())),
    }
    cls = type(qualname.rsplit(":", 1)[-1], (base,), namespace)
    _introspectable(cls, qualname, spec)
    for name, nested in spec.get("nested", {}).items():
        setattr(cls, name, _recorded_class(f"{qualname}.{name}", nested))
    return cls


_KINDS = {
    "positional_only": inspect.Parameter.POSITIONAL_ONLY,
    "positional_or_keyword": inspect.Parameter.POSITIONAL_OR_KEYWORD,
    "keyword_only": inspect.Parameter.KEYWORD_ONLY,
    "var_positional": inspect.Parameter.VAR_POSITIONAL,
    "var_keyword": inspect.Parameter.VAR_KEYWORD,
}


def _signature(params: list[dict[str, Any]], *, method: bool = True) -> inspect.Signature:
    head = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)] if method else []
    return inspect.Signature(
        head
        + [
            inspect.Parameter(p["name"], _KINDS[p["kind"]], default=inspect.Parameter.empty if p["required"] else None)
            if p["kind"] not in ("var_positional", "var_keyword")
            else inspect.Parameter(p["name"], _KINDS[p["kind"]])
            for p in params
        ]
    )


def _introspectable(cls: type, qualname: str, spec: dict[str, Any]) -> None:
    """Give a stub class the surface deploy/gpu/record_trtllm_api.py reads on the real one.

    Pydantic models get `model_fields`, dataclasses `__dataclass_fields__`, classes an `__init__` signature, and
    every recorded method a function with the recorded signature (binding its arguments, then refusing to run:
    below the API the stub runs only what `build` wires to the fake model).
    """
    from pydantic.fields import FieldInfo

    kind = spec["kind"]
    if kind == "model":
        cls.model_fields = {
            name: FieldInfo(
                annotation=Literal[tuple(f["choices"])] if "choices" in f else Any,  # type: ignore[misc]
                default=... if f["required"] else f.get("default"),
                json_schema_extra={"status": "deprecated"} if name in spec.get("deprecated", ()) else None,
            )
            for name, f in spec.get("fields", {}).items()
        }
    elif kind == "dataclass":
        fields = spec.get("fields", {})
        order = [p["name"] for p in spec.get("init", []) if p["name"] in fields]
        order += [name for name in fields if name not in order]
        made = dataclasses.make_dataclass(
            cls.__name__,
            [
                (name, Any) if fields[name]["required"] else (name, Any, dataclasses.field(default=None))
                for name in order
            ],
            kw_only=not spec.get("init"),
        )
        cls.__dataclass_fields__ = made.__dataclass_fields__
        cls.__dataclass_params__ = made.__dataclass_params__
    if kind == "class" or "init" in spec:
        init = cls.__init__

        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            init(self, *args, **kwargs)

        __init__.__signature__ = _signature(spec.get("init", []))  # type: ignore[attr-defined]
        cls.__init__ = __init__  # type: ignore[misc]
    for method, params in spec.get("methods", {}).items():
        if any(method in klass.__dict__ for klass in cls.__mro__[:-1]):
            continue  # the stub runs it

        def refuse(*args: Any, _method: str = method, **kwargs: Any) -> Any:
            raise NotImplementedError(f"the stub does not run {qualname}.{_method}")

        refuse.__signature__ = _signature(params)  # type: ignore[attr-defined]
        setattr(cls, method, refuse)


def check_call(qualname: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Bind a call to a recorded method's parameters; TypeError for anything the release does not accept."""
    params = API["symbols"][qualname]["methods"][method]
    names = [p["name"] for p in params if p["kind"] != "var_keyword"]
    positional = [p["name"] for p in params if p["kind"] in ("positional_only", "positional_or_keyword")]
    # A recorded **kwargs lists the names the release reads from it ("accepts"); others it would ignore silently.
    extra = next((p.get("accepts", ()) for p in params if p["kind"] == "var_keyword"), ())
    if len(args) > len(positional):
        raise TypeError(f"{qualname}.{method}() takes {len(positional)} positional arguments")
    bound = dict(zip(positional, args, strict=False))
    for name, value in kwargs.items():
        if name not in names and name not in extra:
            raise TypeError(f"{qualname}.{method}() got an unexpected keyword argument {name!r}")
        bound[name] = value
    if missing := [p["name"] for p in params if p["required"] and p["name"] not in bound]:
        raise TypeError(f"{qualname}.{method}() missing required arguments {missing}")
    return bound


# -- the fake model below the API ----------------------------------------------------------------------------------


@dataclass
class FakeModel:
    """A deterministic model over a small vocabulary, scriptable by tests.

    Unconstrained, sequence `i` prefers an ordinary token (not one of the first `specials` ids) that depends on the
    step, `i` and the prompt's length; `script` forces the preferred tokens instead (a list per sequence, then the
    end token). The preferred token gets logit 10, every other 0, then the request's logits processors run and the
    argmax is taken: a bias of -100 on the preferred token changes the output. As the release does, a sequence
    ends on `end_id` or one of `stop_token_ids`, kept in `token_ids` as the PyTorch backend's sampler writes them
    (`end_token_in_output=False` drops them instead, as the TensorRT engine path does: ARK must handle both); when
    the request is final a stop token is cut and named by `stop_reason` (None for `end_id`).
    """

    vocab_size: int = 64
    eos_token_id: int = 2
    specials: int = 3
    script: list[list[int]] | None = None
    # Every call the engine made, for assertions: ("generate_async", kwargs), ("abort", request_id), ...
    calls: list[tuple[str, Any]] = field(default_factory=list)
    # KV-cache: prompts seen per cache salt (None: unsalted).
    cached_prompts: dict[str | None, list[list[int]]] = field(default_factory=dict)
    # Set to make the next request fail after its first output, as a GPU error would.
    fail_after_first: bool = False
    step_delay: float = 0.0
    end_token_in_output: bool = True

    def cached_tokens(self, prompt: list[int], salt: str | None) -> int:
        best = 0
        for seen in self.cached_prompts.get(salt, []):
            common = 0
            for a, b in zip(seen, prompt, strict=False):
                if a != b:
                    break
                common += 1
            best = max(best, common)
        self.cached_prompts.setdefault(salt, []).append(list(prompt))
        return min(best, len(prompt) - 1)

    def logits(self, sequence: int, step: int, prompt_len: int) -> Any:
        import torch

        logits = torch.zeros(1, self.vocab_size)
        if self.script is not None:
            tokens = self.script[sequence]
            preferred = tokens[step] if step < len(tokens) else self.eos_token_id
        else:
            ordinary = self.vocab_size - self.specials
            preferred = self.specials + (step * 7 + sequence * 3 + prompt_len) % ordinary
        logits[0, preferred] = 10.0
        return logits


def build(model: FakeModel) -> dict[str, types.ModuleType]:
    """The stub's modules, keyed by name, wired to `model`."""
    modules: dict[str, types.ModuleType] = {}

    def module(name: str) -> types.ModuleType:
        if name not in modules:
            modules[name] = types.ModuleType(name)
            modules[name].__dict__["__stub__"] = True
            parent, _, child = name.rpartition(".")
            if parent:
                setattr(module(parent), child, modules[name])
        return modules[name]

    classes: dict[str, type] = {}
    bases = {SAMPLING_NAME: _SamplingParamsBase, COMPLETION_NAME: _CompletionOutputBase}
    for qualname, spec in API["symbols"].items():
        if qualname in (LLM_NAME, OUTPUT_NAME):
            continue
        classes[qualname] = _recorded_class(qualname, spec, base=bases.get(qualname, RecordedObject))
    classes[LLM_NAME] = _llm_class(model, classes)
    classes[OUTPUT_NAME] = _recorded_class(OUTPUT_NAME, API["symbols"][OUTPUT_NAME], base=_RequestOutputBase)
    for qualname, cls in classes.items():
        module_name, name = qualname.split(":")
        for where in [module_name, *API["symbols"][qualname].get("exported_from", [])]:
            setattr(module(where), name, cls)
    module("tensorrt_llm").__version__ = API["version"]
    return modules


@contextmanager
def installed(model: FakeModel) -> Iterator[dict[str, types.ModuleType]]:
    """Put the stub in `sys.modules` for the duration (and take it out again, restoring what was there)."""
    modules = build(model)
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield modules
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


LLM_NAME = "tensorrt_llm.llmapi:LLM"
OUTPUT_NAME = "tensorrt_llm.llmapi:RequestOutput"
ARGS_NAME = "tensorrt_llm.llmapi:TorchLlmArgs"
COMPLETION_NAME = "tensorrt_llm.executor.result:CompletionOutput"
LOGPROB_NAME = "tensorrt_llm.executor.result:Logprob"
SAMPLING_NAME = "tensorrt_llm.sampling_params:SamplingParams"


class _SamplingParamsBase(RecordedObject):
    """`SamplingParams.__post_init__` → `_validate()`, as in 1.2's sampling_params.py (the rules ARK can meet)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        n = self.n if self.n is not None else 1
        self._values.setdefault("n", n)
        self._values.setdefault("max_tokens", 32)
        self._values["best_of"] = self.best_of or n
        if self.top_p is not None and not 0 <= self.top_p <= 1:
            raise ValueError(f"require 0 <= top_p <= 1, got top_p={self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"require top_k >= 0, got top_k={self.top_k}")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"require temperature >= 0, got temperature={self.temperature}")
        if self.best_of < n:
            raise ValueError(f"best_of ({self.best_of}) cannot be less than n ({n})")
        greedy = (
            (self.temperature is None and self.top_p is None and self.top_k is None)
            or self.top_k == 1
            or self.top_p == 0.0
            or self.temperature == 0
        )
        if (
            self.best_of > 1
            and greedy
            and not self.use_beam_search
            and not os.environ.get("TLLM_ALLOW_N_GREEDY_DECODING")
        ):
            raise ValueError(
                f"Greedy decoding in the LLM API does not allow multiple returns. Please set to best_of=1, "
                f"got best_of={self.best_of}."
            )


class _CompletionOutputBase(RecordedObject):
    """`CompletionOutput`'s diffs are views on what `_handle_sequence` last appended to that one output."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._values.setdefault("text", "")
        self._values.setdefault("token_ids", [])
        self._values.setdefault("logprobs", [])
        self._values.update(_last_token_ids_len=0, _last_logprobs_len=0)

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def text_diff(self) -> str:
        return ""  # ARK turns detokenization off

    @property
    def token_ids_diff(self) -> list[int]:
        return self.token_ids[self._values["_last_token_ids_len"] :]

    @property
    def logprobs_diff(self) -> list[Any]:
        return self.logprobs[self._values["_last_logprobs_len"] :]


class _RequestOutputBase(RecordedObject):
    """The async-iterable result of `generate_async(..., streaming=True)`."""

    def __aiter__(self) -> Any:
        return self._values["_stream"]

    def abort(self) -> None:
        check_call(OUTPUT_NAME, "abort", (), {})
        self._values["_aborted"].set()
        self._values["_model"].calls.append(("abort", self.request_id))


def _llm_class(model: FakeModel, classes: dict[str, type]) -> type:
    args_spec = API["symbols"][ARGS_NAME]
    llm_spec = API["symbols"][LLM_NAME]
    init_names = [p["name"] for p in llm_spec["init"] if p["kind"] != "var_keyword"]
    completion_cls = classes[COMPLETION_NAME]
    logprob_cls = classes[LOGPROB_NAME]
    kv_cache_config_cls = classes["tensorrt_llm.llmapi:KvCacheConfig"]
    retention_cls = classes["tensorrt_llm.bindings.executor:KvCacheRetentionConfig"]
    sampling_cls = classes["tensorrt_llm.sampling_params:SamplingParams"]
    guided_cls = classes["tensorrt_llm.sampling_params:GuidedDecodingParams"]

    class LLM:
        """The stub of `tensorrt_llm.LLM` (PyTorch backend): validates its arguments, then runs `model`."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            bound = dict(zip(init_names, args, strict=False))
            for name, value in kwargs.items():
                if name in bound:
                    raise TypeError(f"LLM() got multiple values for {name!r}")
                bound[name] = value
            # What `LLM(...)` does with its keywords: TorchLlmArgs(**kwargs) validates them all.
            self.args = _recorded_class(ARGS_NAME, args_spec)(**bound)
            kv = bound.get("kv_cache_config")
            if kv is not None and not isinstance(kv, kv_cache_config_cls):
                raise TypeError("kv_cache_config must be a KvCacheConfig")
            # ARK reads the checkpoint's tokenizer itself (transformers), so the stub's stays unset.
            self.tokenizer = None
            self._next_id = 0
            model.calls.append(("LLM", bound))

        def generate_async(self, *args: Any, **kwargs: Any) -> Any:
            bound = check_call(LLM_NAME, "generate_async", args, kwargs)
            model.calls.append(("generate_async", bound))
            inputs = bound["inputs"]
            if not (isinstance(inputs, list) and all(isinstance(t, int) for t in inputs)):
                raise TypeError("ARK passes prompts as token id lists")
            params = bound.get("sampling_params")
            if not isinstance(params, sampling_cls):
                raise TypeError("sampling_params must be a SamplingParams")
            retention = bound.get("kv_cache_retention_config")
            if retention is not None and not isinstance(retention, retention_cls):
                raise TypeError("kv_cache_retention_config must be a KvCacheRetentionConfig")
            guided = params.guided_decoding
            if guided is not None:
                if not isinstance(guided, guided_cls):
                    raise TypeError("guided_decoding must be a GuidedDecodingParams")
                if self.args.guided_decoding_backend is None:
                    raise ValueError("guided decoding requested, but the LLM has no guided_decoding_backend")
            if "max_tokens" not in params._values:
                raise AssertionError("ARK always sets max_tokens (the release's default is 32)")
            # llm.py's _check_arguments (PyTorch backend): without chunked prefill, one prompt must fit one batch.
            if not self.args.enable_chunked_prefill and len(inputs) > self.args.max_num_tokens:
                raise ValueError(
                    f"The sum of prompt length ({float(len(inputs))}), query length (0) should not exceed "
                    f"max_num_tokens ({self.args.max_num_tokens})"
                )
            salt = bound.get("cache_salt")
            if salt is not None and not (isinstance(salt, str) and salt):
                raise ValueError("cache_salt must be a non-empty string or None")
            self._next_id += 1
            aborted = asyncio.Event()
            output = classes[OUTPUT_NAME]()
            output._values.update(
                _stream=_stream(model, output, list(inputs), params, salt, aborted, completion_cls, logprob_cls),
                _aborted=aborted,
                _model=model,
                request_id=self._next_id,
                prompt_token_ids=list(inputs),
                finished=False,
                outputs=[],
            )
            return output

        def shutdown(self) -> None:
            check_call(LLM_NAME, "shutdown", (), {})
            model.calls.append(("shutdown", None))

    LLM.__init__.__signature__ = _signature(llm_spec["init"])  # type: ignore[attr-defined]
    for method, params in llm_spec["methods"].items():
        getattr(LLM, method).__signature__ = _signature(params)
    return LLM


async def _stream(
    model: FakeModel,
    output: Any,
    prompt: list[int],
    params: Any,
    salt: str | None,
    aborted: asyncio.Event,
    completion_cls: type,
    logprob_cls: type,
) -> Any:
    """What `generate_async(..., streaming=True)` yields: one response per sequence and step, as the PyTorch
    backend's child requests send them, each handled as `GenerationResultBase._handle_sequence` does."""
    import torch

    n = params.n
    output._values["cached_tokens"] = model.cached_tokens(prompt, salt)
    processors = params.logits_processor or []
    processors = processors if isinstance(processors, list) else [processors]
    completions = [completion_cls(i) for i in range(n)]
    output._values["outputs"] = completions
    end_id = params.end_id if params.end_id is not None else model.eos_token_id
    final = [False] * n  # the runtime's per-sequence `is_sequence_final`
    step = 0
    while not all(final):
        await asyncio.sleep(model.step_delay)
        for i, completion in enumerate(completions):
            if final[i]:
                continue
            if aborted.is_set():
                return
            logits = model.logits(i, step, len(prompt))
            for processor in processors:
                processor(output.request_id, logits, [prompt + completion.token_ids], None, None)
            token = int(torch.argmax(logits[0]))
            reason = None
            if not params.ignore_eos and token == end_id:
                reason = "end_id"
            elif not params.ignore_eos and token in (params.stop_token_ids or ()):
                reason = "stop_words"
            elif len(completion.token_ids) + 1 >= params.max_tokens:
                reason = "length"
            final[i] = reason is not None
            new = [] if reason in ("end_id", "stop_words") and not model.end_token_in_output else [token]
            # _handle_sequence: only this sequence's output advances.
            completion._values["_last_token_ids_len"] = len(completion.token_ids)
            completion._values["token_ids"] = completion.token_ids + new
            if params.logprobs:
                log_probs = torch.log_softmax(logits[0].float(), dim=-1)
                top = torch.topk(log_probs, params.logprobs)
                entry = {
                    int(t): logprob_cls(float(v), r + 1)
                    for r, (v, t) in enumerate(zip(top.values, top.indices, strict=True))
                }
                entry.setdefault(token, logprob_cls(float(log_probs[token]), None))
                completion._values["_last_logprobs_len"] = len(completion.logprobs)
                completion._values["logprobs"] = completion.logprobs + [entry] * len(new)
            done = all(final)  # `_done` ← the response's `is_final`: every sequence has finished
            if done and reason == "length":
                completion._values["finish_reason"] = "length"
            elif done and reason is not None:
                completion._values["finish_reason"] = "stop"
                if reason == "stop_words":
                    completion._values["stop_reason"] = token
                    if new and not params.include_stop_str_in_output:
                        completion._values["token_ids"] = completion.token_ids[:-1]
            output._values["finished"] = done
            yield output
            if model.fail_after_first:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
        step += 1
