"""The recorded TensorRT-LLM API (tests/support/trtllm_api.json), the stub built from it, and its generator.

On CPU: the stub refuses what the release would refuse, and deploy/gpu/record_trtllm_api.py reads signatures the
way it must on the real package (checked on local classes of each kind). Where tensorrt_llm is installed, the last
test compares the record with the installed release: everything ARK relies on must be there.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from tests.support.trtllm_stub import API, FakeModel, build, installed

ROOT = Path(__file__).resolve().parents[2]
HAS_TRTLLM = importlib.util.find_spec("tensorrt_llm") is not None


@pytest.fixture(scope="module")
def stub():
    return build(FakeModel())


def test_the_record_names_one_release_and_how_to_regenerate_it():
    assert API["package"] == "tensorrt-llm" and API["version"] == "1.2.1"
    assert API["regenerate"].startswith("python deploy/gpu/record_trtllm_api.py")
    for qualname, symbol in API["symbols"].items():
        module, _, name = qualname.partition(":")
        assert module.startswith("tensorrt_llm") and name, qualname
        assert symbol["kind"] in {"class", "model", "dataclass", "abstract"}, qualname


def test_the_stub_refuses_arguments_the_release_does_not_have(stub):
    llmapi, sampling = stub["tensorrt_llm.llmapi"], stub["tensorrt_llm.sampling_params"]
    assert stub["tensorrt_llm"].SamplingParams is sampling.SamplingParams is llmapi.SamplingParams
    with pytest.raises(TypeError, match="unexpected keyword argument 'beam_width'"):
        sampling.SamplingParams(beam_width=4)
    with pytest.raises(TypeError, match="keyword arguments only"):
        llmapi.GuidedDecodingParams('{"type": "object"}')
    with pytest.raises(TypeError, match="'enable_block_reuse_typo'"):
        llmapi.KvCacheConfig(enable_block_reuse_typo=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'prompt'"):
        stub["tensorrt_llm"].LLM(model="/m").generate_async([1, 2], prompt="x")


def test_the_stub_checks_choices_deprecations_and_attributes(stub):
    LLM = stub["tensorrt_llm"].LLM
    with pytest.raises(ValueError, match="guided_decoding_backend"):
        LLM(model="/m", guided_decoding_backend="outlines")
    with pytest.raises(TypeError, match="deprecated"):
        LLM(model="/m", backend="pytorch")
    with pytest.raises(TypeError, match="missing required"):
        LLM(tokenizer="/m")
    params = stub["tensorrt_llm"].SamplingParams(max_tokens=8)
    assert params.max_tokens == 8 and params.temperature is None
    with pytest.raises(AttributeError, match="beam_width"):
        _ = params.beam_width
    retention = stub["tensorrt_llm.llmapi"].KvCacheRetentionConfig
    config = retention([retention.TokenRangeRetentionConfig(0, None, 80)], 80)
    assert config.token_range_retention_configs[0].priority == 80
    with pytest.raises(TypeError, match="positional"):
        retention.TokenRangeRetentionConfig(0, None, 80, None, "extra")


def test_a_recorded_kwargs_takes_only_the_names_the_release_reads():
    from tests.support.trtllm_stub import check_call

    runner = "tensorrt_llm.runtime:ModelRunnerCpp"
    bound = check_call(runner, "generate", ([1, 2],), {"max_new_tokens": 4, "num_beams": 1})
    assert bound["batch_input_ids"] == [1, 2] and bound["num_beams"] == 1
    with pytest.raises(TypeError, match="'beam_width'"):
        check_call(runner, "generate", ([1, 2],), {"beam_width": 1})  # the release would ignore it silently
    with pytest.raises(TypeError, match="positional"):
        check_call(runner, "from_dir", ("/engine", True), {})


# -- the generator script, on local classes of each kind ------------------------------------------------------------


def test_the_generator_keeps_the_names_a_kwargs_is_read_for():
    rec = _recorder()
    symbols = {"m:C": {"methods": {"f": [{"name": "kwargs", "kind": "var_keyword", "required": False}]}}}
    previous = {"m:C": {"methods": {"f": [{"kind": "var_keyword", "accepts": ["a"]}]}}}
    rec._keep_accepts(symbols, previous)
    assert symbols["m:C"]["methods"]["f"][0]["accepts"] == ["a"]


def _recorder():
    sys.path.insert(0, str(ROOT / "deploy" / "gpu"))
    try:
        import record_trtllm_api
    finally:
        sys.path.pop(0)
    return record_trtllm_api


class _Args(BaseModel):
    model: str
    backend: str | None = Field(default=None, json_schema_extra={"status": "deprecated"})
    guided_decoding_backend: Literal["xgrammar", "llguidance"] | None = None


@dataclasses.dataclass(kw_only=True)
class _Params:
    max_tokens: int = 32
    stop: list[str] | None = None
    _private: int = dataclasses.field(default=0, init=False)

    @property
    def text_diff(self) -> str:
        return ""


@dataclasses.dataclass(slots=True)
class _Logprob:  # as tensorrt_llm.executor.result.Logprob: a slots dataclass, not a namedtuple
    logprob: float
    rank: int | None = None


class _Output:
    def __init__(self, request_id: int) -> None:
        self.request_id = request_id
        self.finished = False

    def abort(self) -> None: ...


def test_the_generator_reads_models_dataclasses_and_classes():
    rec = _recorder()
    args = rec._record(_Args, {"kind": "model"})
    assert args["fields"]["model"] == {"required": True}
    assert args["fields"]["guided_decoding_backend"]["choices"] == ["xgrammar", "llguidance", None]
    assert args["deprecated"] == ["backend"]
    params = rec._record(_Params, {"kind": "dataclass"})
    assert set(params["fields"]) == {"max_tokens", "stop"} and params["attributes"] == ["text_diff"]
    assert "init" not in params, "a kw_only dataclass takes no positional arguments"
    logprob = rec._record(_Logprob, {"kind": "dataclass"})
    assert logprob["fields"] == {"logprob": {"required": True}, "rank": {"required": False}}
    assert [p["name"] for p in logprob["init"]] == ["logprob", "rank"], "positional order kept"
    output = rec._record(_Output, {"kind": "class", "methods": ["abort"]})
    assert output["init"] == [{"name": "request_id", "kind": "positional_or_keyword", "required": True}]
    assert output["attributes"] == ["finished", "request_id"] and output["methods"] == {"abort": []}


def test_the_generator_parses_pybind11_signatures():
    rec = _recorder()

    class Binding:
        """__init__(self: KvCacheRetentionConfig, token_range_retention_configs: list[Range], decode_retention_priority: int = 35, decode_duration_ms: Optional[datetime.timedelta] = None) -> None"""  # noqa: E501

    assert rec._pybind_params(Binding) == [
        {"name": "token_range_retention_configs", "kind": "positional_or_keyword", "required": True},
        {"name": "decode_retention_priority", "kind": "positional_or_keyword", "required": False},
        {"name": "decode_duration_ms", "kind": "positional_or_keyword", "required": False},
    ]


def test_the_generator_runs_on_the_stubs_module_surface_and_gives_back_the_record():
    """deploy/gpu/record_trtllm_api.py on the stub's modules: every recorded name is found where ARK imports it,
    read the way the real package is read, and comes back as recorded (fields, required arguments, methods)."""
    rec = _recorder()
    with installed(FakeModel()):
        again = rec.record(API)
    assert again["version"] == API["version"] and set(again["symbols"]) == set(rec.SPEC)
    assert set(rec.SPEC) == set(API["symbols"]), "the record holds what the generator writes, no more"
    for qualname, recorded in API["symbols"].items():
        actual = again["symbols"][qualname]
        assert actual["kind"] == recorded["kind"], qualname
        assert actual.get("fields", {}) == recorded.get("fields", {}), qualname
        assert [(p["name"], p["required"]) for p in actual.get("init", [])] == [
            (p["name"], p["required"]) for p in recorded.get("init", [])
        ], qualname
        for method, params in recorded.get("methods", {}).items():
            assert [p["name"] for p in actual["methods"][method]] == [p["name"] for p in params], (qualname, method)


def test_the_stub_is_as_strict_as_the_release_where_ark_depends_on_it(stub):
    retention = stub["tensorrt_llm.llmapi"].KvCacheRetentionConfig
    with pytest.raises(TypeError, match=r"missing required arguments \['token_end', 'priority'\]"):
        retention.TokenRangeRetentionConfig(0)  # the nanobind binding has no defaults for them
    sampling = stub["tensorrt_llm"].SamplingParams
    for greedy in ({"temperature": 0.0}, {"temperature": 0.7, "top_k": 1}, {"temperature": 0.7, "top_p": 0.0}):
        with pytest.raises(ValueError, match="Greedy decoding in the LLM API does not allow multiple returns"):
            sampling(n=2, max_tokens=4, **greedy)
    assert sampling(n=2, max_tokens=4, temperature=0.7).best_of == 2
    # Valid TorchLlmArgs fields the first record lacked are accepted; the chunking defaults are the release's.
    llm = stub["tensorrt_llm"].LLM(
        model="/m", fail_fast_on_attention_window_too_large=False, batch_wait_timeout_iters=0
    )
    assert llm.args.max_num_tokens == 8192 and llm.args.enable_chunked_prefill is False
    with pytest.raises(ValueError, match="should not exceed max_num_tokens"):
        llm.generate_async([1] * 8193, sampling_params=sampling(max_tokens=4))
    logprob = stub["tensorrt_llm.executor.result"].Logprob(-0.5, 1)
    assert dataclasses.is_dataclass(logprob) and (logprob.logprob, logprob.rank) == (-0.5, 1)


def test_the_embeddings_engines_session_calls_bind_to_the_record(stub):
    """services/embeddings/engines/tensorrt_llm.py's calls on `Session` / `TensorInfo`, as it makes them."""
    from tests.support.trtllm_stub import check_call

    session = "tensorrt_llm.runtime:Session"
    runtime = stub["tensorrt_llm.runtime"]
    info = runtime.TensorInfo("input_ids", "INT32", (2, 7))  # positional, as the engine builds them
    assert (info.name, info.shape) == ("input_ids", (2, 7))
    check_call(session, "from_serialized_engine", (b"engine",), {})
    check_call(session, "infer_shapes", ([info],), {})
    check_call(session, "run", (), {"inputs": {}, "outputs": {}, "stream": 0})
    with pytest.raises(TypeError, match="stream"):
        check_call(session, "run", (), {"inputs": {}, "outputs": {}})
    source = (ROOT / "services" / "embeddings" / "engines" / "tensorrt_llm.py").read_text()
    assert (
        "Session.from_serialized_engine(" in source
        and "self._session.run(inputs=inputs, outputs=outputs, stream=" in source
    )


# -- the real release -------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRTLLM, reason="needs the tensorrt_llm package (the GPU image)")
def test_the_installed_release_has_everything_recorded():  # pragma: no cover - GPU image only
    real = _recorder().record()
    assert real["version"] == API["version"]
    for qualname, recorded in API["symbols"].items():
        actual = real["symbols"][qualname]
        assert set(recorded.get("fields", {})) <= set(actual.get("fields", {})), qualname
        assert {p["name"] for p in recorded.get("init", [])} <= {p["name"] for p in actual.get("init", [])}, qualname
        assert set(recorded.get("attributes", [])) <= set(actual.get("attributes", [])), qualname
        for method, params in recorded.get("methods", {}).items():
            assert {p["name"] for p in params} <= {p["name"] for p in actual["methods"][method]}, (qualname, method)
