"""The TensorRT-LLM chat engine's mapping, on CPU, against a stub built from the recorded 1.2.1 API.

The stub (tests/support/trtllm_stub) refuses any argument the release does not have and runs a tiny deterministic
model below the API; the tokenizer is a real Hugging Face tokenizer (byte-level BPE, ChatML template) made here.
The engine runs under the real generation layer, so each test reads what a client would get: choices, logprobs,
tool calls, cached tokens, errors before `Started`. On a machine with tensorrt_llm and a GPU the last test runs the
real release.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from services.chat.domain import (
    Delta,
    Finished,
    FinishReason,
    GenerationRequest,
    Message,
    ResponseFormat,
    ResponseFormatType,
    Role,
    Sampling,
    Started,
    Tool,
    ToolChoice,
    ToolChoiceMode,
)
from services.common.config import ConfigError, ModelConfig
from services.common.errors import InvalidRequestError, UnsupportedParameterError
from tests.support.trtllm_stub import FakeModel, installed

HAS_TRTLLM = importlib.util.find_spec("tensorrt_llm") is not None
HAS_GPU = shutil.which("nvidia-smi") is not None
ROOT = Path(__file__).resolve().parents[2]

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The capital of France is Paris. The weather in Paris is sunny today.",
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    "Hello! How can I help you? Tell me a story about a small robot and a cat.",
    "user assistant system developer tool: 0123456789 {}[]:,\"' \n\t",
] * 20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A Hugging Face checkpoint folder holding only what ARK reads itself: the tokenizer and generation config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("checkpoint")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return folder


@pytest.fixture
def fake(checkpoint):
    from transformers import AutoTokenizer

    model = FakeModel(vocab_size=len(AutoTokenizer.from_pretrained(str(checkpoint))), eos_token_id=2)
    with installed(model):
        yield model


def _engine(checkpoint: Path, **settings):
    from services.chat.engines import create_engine

    settings = {"max_seq_len": 256, **settings}  # short: a generation without max_tokens fills the window
    model = ModelConfig(id="m", capability="chat", engine="tensorrt_llm", path=str(checkpoint), settings=settings)
    return create_engine(model)


def _generator(checkpoint: Path, **settings):
    from services.chat.generator import Generator

    return Generator(_engine(checkpoint, **settings), max_queue=4)


def _request(text: str = "Tell me a story.", **kwargs) -> GenerationRequest:
    messages = kwargs.pop("messages", (Message(Role.USER, text),))
    return GenerationRequest("r", "m", messages, **kwargs)


async def _collect(generator, request) -> list:
    """The events a client's stream is made of (from `Started` on)."""
    events = [event async for event in generator.generate(request)]
    return events[next(i for i, e in enumerate(events) if isinstance(e, Started)) :]


def _generate_calls(fake: FakeModel) -> list[dict]:
    return [kwargs for name, kwargs in fake.calls if name == "generate_async"]


def _text(events, index: int = 0) -> str:
    return "".join(e.text for e in events if isinstance(e, Delta) and e.choice_index == index)


# -- construction ---------------------------------------------------------------------------------------------------


def test_selecting_tensorrt_llm_without_it_fails_clearly():
    if HAS_TRTLLM:
        pytest.skip("tensorrt_llm is installed here")
    from services.chat.engines import create_engine
    from services.common.errors import UnavailableError

    model = ModelConfig(id="m", capability="chat", engine="tensorrt_llm", path="/nonexistent")
    with pytest.raises(UnavailableError, match="tensorrt-llm"):
        create_engine(model)


def test_the_llm_is_built_with_block_reuse_and_the_guided_decoding_backend_and_without_backend(fake, checkpoint):
    _engine(checkpoint, host_cache_size=1024, max_seq_len=512)
    (llm,) = [kwargs for name, kwargs in fake.calls if name == "LLM"]
    assert "backend" not in llm, "deprecated in 1.2.1: the PyTorch backend is the LLM class itself"
    assert llm["guided_decoding_backend"] == "llguidance"
    assert llm["sampler_type"] == "TorchSampler" and llm["max_seq_len"] == 512
    assert llm["kv_cache_config"].enable_block_reuse is True and llm["kv_cache_config"].host_cache_size == 1024


def test_an_argument_the_release_does_not_have_fails_at_start(fake, checkpoint):
    with pytest.raises(TypeError, match="not_an_llm_arg"):
        _engine(checkpoint, llm_args={"not_an_llm_arg": 1})


def test_a_misspelt_setting_is_a_configuration_error_naming_it(fake, checkpoint):
    with pytest.raises(ConfigError, match=r"settings\.max_batch_sise"):
        _engine(checkpoint, max_batch_sise=8)


# -- generation -----------------------------------------------------------------------------------------------------


async def test_a_completion_reports_cached_tokens_before_any_token_and_salts_by_api_key(fake, checkpoint):
    generator = _generator(checkpoint)
    first = await _collect(generator, _request(api_key_hash="key-a"))
    assert isinstance(first[0], Started) and first[0].cached_tokens == 0
    assert _text(first) and isinstance(first[-1], Finished)
    again = await _collect(generator, _request(api_key_hash="key-a"))
    assert again[0].cached_tokens == again[0].prompt_tokens - 1, "the same key reuses its prompt's blocks"
    assert again[-1].usage.cached_tokens == again[0].cached_tokens
    other = await _collect(generator, _request(api_key_hash="key-b"))
    assert other[0].cached_tokens == 0, "another API key never reuses them"
    await _collect(generator, _request())
    salts = [call["cache_salt"] for call in _generate_calls(fake)]
    assert salts == ["key-a", "key-a", "key-b", None], "no key: no salt (None), not an empty one"


async def test_max_tokens_is_always_set_and_tokens_are_sent_as_ids(fake, checkpoint):
    generator = _generator(checkpoint, max_seq_len=512)
    events = await _collect(generator, _request(sampling=Sampling(temperature=0.0, max_tokens=5)))
    (call,) = _generate_calls(fake)
    params = call["sampling_params"]
    assert params.max_tokens == 5 and params.top_k == 1 and params.detokenize is False
    assert isinstance(call["inputs"], list) and len(call["inputs"]) == events[0].prompt_tokens
    assert events[-1].finish_reason is FinishReason.LENGTH and events[-1].usage.completion_tokens == 5
    await _collect(generator, _request())
    assert _generate_calls(fake)[1]["sampling_params"].max_tokens == 512 - events[0].prompt_tokens


async def test_n_choices_are_the_outputs_of_one_request(fake, checkpoint):
    events = await _collect(_generator(checkpoint), _request(sampling=Sampling(temperature=0.8, n=3, max_tokens=6)))
    (call,) = _generate_calls(fake)
    assert call["sampling_params"].n == 3
    finished = [e for e in events if isinstance(e, Finished)]
    assert sorted(f.choice_index for f in finished) == [0, 1, 2] and not finished[-1].more_choices
    texts = {_text(events, i) for i in range(3)}
    assert len(texts) == 3 and all(texts), "each choice is its own sequence"


async def test_n_above_one_at_temperature_zero_is_refused_before_started(fake, checkpoint):
    generator = _generator(checkpoint)
    with pytest.raises(InvalidRequestError) as refused:
        await _collect(generator, _request(sampling=Sampling(temperature=0.0, n=2)))
    assert refused.value.param == "n" and refused.value.http_status == 400
    assert not _generate_calls(fake)


async def test_logprobs_are_read_from_the_outputs(fake, checkpoint):
    import math

    request = _request(sampling=Sampling(temperature=0.0, max_tokens=4, logprobs=True, top_logprobs=3))
    events = await _collect(_generator(checkpoint), request)
    assert _generate_calls(fake)[0]["sampling_params"].logprobs == 3
    positions = [p for e in events if isinstance(e, Delta) for p in e.logprobs]
    assert len(positions) == 4
    for position in positions:
        assert position.sampled.token == position.top[0].token and len(position.top) == 3
        # The fake's logits: 10 on one token of V, 0 elsewhere.
        vocab = fake.vocab_size
        assert math.isclose(position.sampled.logprob, 10 - math.log(math.exp(10) + vocab - 1), rel_tol=1e-4)


async def test_logit_bias_goes_through_a_logits_processor(fake, checkpoint):
    generator = _generator(checkpoint)
    plain = await _collect(generator, _request(sampling=Sampling(temperature=0.0, max_tokens=1)))
    (first_token,) = [t for e in plain if isinstance(e, Delta) for t in e.token_ids]
    biased = await _collect(
        generator, _request(sampling=Sampling(temperature=0.0, max_tokens=1, logit_bias={first_token: -100.0}))
    )
    assert [t for e in biased if isinstance(e, Delta) for t in e.token_ids] != [first_token]
    assert callable(_generate_calls(fake)[1]["sampling_params"].logits_processor)


@pytest.mark.parametrize(
    ("sampling", "param"),
    [
        (Sampling(seed=7), "seed"),
        (Sampling(min_p=0.1), "min_p"),
        (Sampling(presence_penalty=0.5), "presence_penalty"),
        (Sampling(frequency_penalty=-0.5), "frequency_penalty"),
        (Sampling(repetition_penalty=1.2), "repetition_penalty"),
    ],
)
async def test_what_the_default_sampler_would_ignore_is_refused_or_routed(fake, checkpoint, sampling, param):
    with pytest.raises(UnsupportedParameterError) as refused:
        await _collect(_generator(checkpoint), _request(sampling=sampling))
    assert refused.value.param == param and "TRTLLMSampler" in refused.value.message
    assert not _generate_calls(fake)
    await _collect(_generator(checkpoint, sampler_type="TRTLLMSampler"), _request(sampling=sampling))
    params = _generate_calls(fake)[0]["sampling_params"]
    assert getattr(params, param) == getattr(sampling, param)


async def test_json_modes_and_tools_are_constrained_by_the_layers_grammar(fake, checkpoint):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    fake.script = [tokenizer.encode(call, add_special_tokens=False)]
    tool = Tool("get_weather", "Weather in a city", json.dumps({"type": "object", "properties": {"city": {}}}))
    request = _request(
        "Weather in Paris?", tools=(tool,), tool_choice=ToolChoice(ToolChoiceMode.REQUIRED), sampling=Sampling(0.0)
    )
    events = await _collect(_generator(checkpoint), request)
    guided = _generate_calls(fake)[0]["sampling_params"].guided_decoding
    assert guided.grammar and guided.json is None
    calls = [c for e in events if isinstance(e, Delta) for c in e.tool_calls]
    assert calls[0].function_name == "get_weather"
    assert json.loads("".join(c.arguments_delta for c in calls)) == {"city": "Paris"}
    assert events[-1].finish_reason is FinishReason.TOOL_CALLS
    fake.script = None
    json_mode = _request(response_format=ResponseFormat(ResponseFormatType.JSON_OBJECT), sampling=Sampling(0.0))
    await _collect(_generator(checkpoint), json_mode)
    assert _generate_calls(fake)[1]["sampling_params"].guided_decoding.grammar


async def test_a_session_keeps_its_blocks_for_its_idle_timeout_and_replays_its_raw_tokens(fake, checkpoint):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    # The model spells its reply one character per token: not how the reply's text tokenizes, so only a replay of
    # the raw tokens (not a re-rendering) puts them back in the next prompt.
    fake.script = [[t for ch in "Hello there" for t in tokenizer.encode(ch, add_special_tokens=False)]]
    assert fake.script[0] != tokenizer.encode("Hello there", add_special_tokens=False)
    generator = _generator(checkpoint)
    first = _request("Hello", session_id="s1", api_key_hash="k", idle_timeout=600.0, sampling=Sampling(0.0))
    events = await _collect(generator, first)
    reply = _text(events)
    call = _generate_calls(fake)[0]
    retention = call["kv_cache_retention_config"]
    assert retention.decode_duration_ms == timedelta(seconds=600) and retention.decode_retention_priority == 80
    (whole,) = retention.token_range_retention_configs
    assert (whole.token_start, whole.token_end, whole.priority) == (0, None, 80)
    raw = [t for e in events if isinstance(e, Delta) for t in e.token_ids] + [2]  # the end token closes the turn
    follow = (Message(Role.USER, "Hello"), Message(Role.ASSISTANT, reply), Message(Role.USER, "And then?"))
    second = await _collect(
        generator,
        _request(messages=follow, session_id="s1", api_key_hash="k", idle_timeout=600, sampling=Sampling(0.0)),
    )
    prompt = _generate_calls(fake)[1]["inputs"]
    assert prompt[: len(call["inputs"]) + len(raw)] == call["inputs"] + raw, "the raw tokens, end token included"
    assert second[0].cached_tokens >= len(call["inputs"])
    await _collect(generator, _request("Stateless", sampling=Sampling(0.0)))
    assert _generate_calls(fake)[2]["kv_cache_retention_config"] is None


@pytest.mark.parametrize("kept", [True, False], ids=["end-token-in-output", "end-token-left-out"])
async def test_the_end_token_is_reported_once_as_a_sample(fake, checkpoint, kept):
    """Whether the release keeps `end_id` / `stop_token_ids` in `token_ids` or not, the transcript gets it once."""
    from services.chat.engines.base import EngineRun, SequenceEnd, TokenSample

    fake.end_token_in_output = kept
    engine = _engine(checkpoint)
    fake.script = [[10, 11], [12]]
    events = [e async for e in engine.run(EngineRun(prompt=[5, 6], sampling=Sampling(0.7), max_new_tokens=8, n=2))]
    for index, tokens in enumerate(fake.script):
        samples = [e.token for e in events if isinstance(e, TokenSample) and e.index == index]
        assert samples == [*tokens, 2] and engine.is_eog(2)
        assert SequenceEnd(index, "eog") in events
    fake.script = [[10, 0]]  # the checkpoint's other end token (generation_config.json), a stop token
    events = [e async for e in engine.run(EngineRun(prompt=[5, 6], sampling=Sampling(0.0), max_new_tokens=8))]
    assert [e.token for e in events if isinstance(e, TokenSample)] == [10, 0]
    assert _generate_calls(fake)[-1]["sampling_params"].stop_token_ids == [0]


# -- what 1.2.1's sources do that a laxer stub hid (issue 22) ---------------------------------------------------------


def _samples(events, index: int) -> list[int]:
    from services.chat.engines.base import TokenSample

    return [e.token for e in events if isinstance(e, TokenSample) and e.index == index]


async def test_n_choices_stream_each_token_once(fake, checkpoint):
    """Finding 1: one response per sequence, and only that output's diff advances; no choice repeats a token."""
    from services.chat.engines.base import EngineRun

    fake.script = [[10, 11, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33]]
    engine = _engine(checkpoint)
    events = [e async for e in engine.run(EngineRun(prompt=[5, 6], sampling=Sampling(0.7), max_new_tokens=16, n=3))]
    for index, tokens in enumerate(fake.script):
        assert _samples(events, index) == [*tokens, 2], index
    streamed = await _collect(_generator(checkpoint), _request(sampling=Sampling(0.8, n=2, max_tokens=16)))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    for index in range(2):
        assert _text(streamed, index) == tokenizer.decode(fake.script[index]), "what a client reads, once"


@pytest.mark.parametrize("kept", [True, False], ids=["end-token-in-output", "end-token-left-out"])
@pytest.mark.parametrize(
    ("script", "max_tokens"),
    [
        ([[10], [20, 21, 22, 23, 24]], 16),  # the first choice ends early, on its end token
        ([[10, 11, 12, 13, 14], [20]], 16),  # the second does
        ([[10, 11, 12, 13, 14, 15], [20]], 3),  # one ends on its budget, the other early on its end token
    ],
    ids=["first-ends-early", "second-ends-early", "length-and-early-end"],
)
async def test_each_choice_ends_on_its_own_though_finish_reason_comes_only_at_the_end(
    fake, checkpoint, script, max_tokens, kept
):
    """Finding 2: 1.2.1 sets `finish_reason` only when every sequence has finished (`_done` <- `is_final`), so a
    choice that ends first never gets one; each choice still ends, with the right reason, and `Finished`."""
    fake.script, fake.end_token_in_output = script, kept
    events = await _collect(_generator(checkpoint), _request(sampling=Sampling(0.8, n=2, max_tokens=max_tokens)))
    finished = {e.choice_index: e for e in events if isinstance(e, Finished)}
    assert set(finished) == {0, 1}
    for index, tokens in enumerate(script):
        expected = FinishReason.LENGTH if len(tokens) >= max_tokens else FinishReason.STOP
        assert finished[index].finish_reason is expected, index
        assert [t for e in events if isinstance(e, Delta) and e.choice_index == index for t in e.token_ids] == (
            tokens[:max_tokens]
        )


@pytest.mark.parametrize(
    ("sampling", "culprit"),
    [
        (Sampling(temperature=0.0, n=2), "temperature 0"),
        (Sampling(temperature=0.8, top_k=1, n=2), "top_k 1"),
        (Sampling(temperature=0.8, top_p=0.0, n=2), "top_p 0"),
    ],
)
async def test_n_above_one_with_greedy_parameters_is_refused_before_started(fake, checkpoint, sampling, culprit):
    """Finding 3: SamplingParams._validate would raise inside generate_async; ARK answers 400 first."""
    with pytest.raises(InvalidRequestError) as refused:
        await _collect(_generator(checkpoint), _request(sampling=sampling))
    assert refused.value.param == "n" and refused.value.http_status == 400 and culprit in refused.value.message
    assert not _generate_calls(fake)


async def test_top_logprobs_above_one_under_trtllm_sampler_is_refused_naming_it(fake, checkpoint):
    """Finding 5: TRTLLMSampler returns top-1 logprobs only; more is refused, never silently cut."""
    generator = _generator(checkpoint, sampler_type="TRTLLMSampler")
    with pytest.raises(UnsupportedParameterError) as refused:
        await _collect(generator, _request(sampling=Sampling(0.0, max_tokens=2, logprobs=True, top_logprobs=3)))
    assert refused.value.param == "top_logprobs" and refused.value.http_status == 400
    assert not _generate_calls(fake)
    events = await _collect(generator, _request(sampling=Sampling(0.0, max_tokens=2, logprobs=True, top_logprobs=1)))
    assert all(len(p.top) == 1 for e in events if isinstance(e, Delta) for p in e.logprobs)
    torch_sampler = await _collect(
        _generator(checkpoint), _request(sampling=Sampling(0.0, max_tokens=2, logprobs=True, top_logprobs=3))
    )
    assert all(len(p.top) == 3 for e in torch_sampler if isinstance(e, Delta) for p in e.logprobs)


async def test_a_prompt_longer_than_max_num_tokens_runs_and_the_context_limit_stays_a_400(fake, checkpoint):
    """Finding 6: without chunked prefill, 1.2.1 refuses inside generate_async any prompt longer than
    max_num_tokens (8192 by default) even within max_seq_len."""
    generator = _generator(checkpoint, max_seq_len=16384)
    (llm,) = [kwargs for name, kwargs in fake.calls if name == "LLM"]
    assert llm["enable_chunked_prefill"] is True
    events = await _collect(generator, _request("word " * 1800, sampling=Sampling(0.0, max_tokens=2)))
    assert events[0].prompt_tokens > 8192 and events[-1].finish_reason is FinishReason.LENGTH
    with pytest.raises(InvalidRequestError) as too_long:
        await _collect(generator, _request("word " * 3400, sampling=Sampling(0.0, max_tokens=2)))
    assert too_long.value.code == "context_length_exceeded" and len(_generate_calls(fake)) == 1


def test_turning_chunked_prefill_off_needs_max_num_tokens_to_cover_the_window(fake, checkpoint):
    with pytest.raises(ConfigError, match="enable_chunked_prefill"):
        _engine(checkpoint, max_seq_len=16384, llm_args={"enable_chunked_prefill": False})
    _engine(checkpoint, max_seq_len=16384, max_num_tokens=16384, llm_args={"enable_chunked_prefill": False})


async def test_errors_come_before_started_and_nothing_reaches_the_engine(fake, checkpoint):
    generator = _generator(checkpoint, max_seq_len=64)
    with pytest.raises(InvalidRequestError) as too_long:
        await _collect(generator, _request("word " * 200))
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(InvalidRequestError) as bias:
        await _collect(generator, _request(sampling=Sampling(logit_bias={10**6: 1.0})))
    assert bias.value.param == "logit_bias"
    assert not _generate_calls(fake)


async def test_closing_the_stream_aborts_the_request(fake, checkpoint):
    fake.step_delay = 0.01
    stream = _generator(checkpoint).generate(_request(sampling=Sampling(0.0, max_tokens=200)))
    async for event in stream:
        if isinstance(event, Delta):
            break
    await stream.aclose()
    assert ("abort", 1) in fake.calls


@pytest.mark.slow
def test_a_gpu_image_never_imports_llama_cpp(checkpoint):
    """The GPU worker's modules import with llama_cpp made unimportable, and it is never loaded."""
    script = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "llama_cpp" or name.startswith("llama_cpp."):
            raise ImportError("llama_cpp is not installed in the GPU image")
sys.meta_path.insert(0, Block())
from tests.support.trtllm_stub import FakeModel, installed
import services.chat.engines.tensorrt_llm, services.chat.generator, services.chat.servicer
import services.embeddings.engines.tensorrt_llm, services.transcription.engines.tensorrt_llm
from services.chat.engines import create_engine
from services.common.config import ModelConfig
with installed(FakeModel(vocab_size=400)):
    create_engine(ModelConfig(id="m", capability="chat", engine="tensorrt_llm", path={str(checkpoint)!r}))
assert not [m for m in sys.modules if m.split(".")[0] == "llama_cpp"]
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_no_chat_engine_module_imports_another():
    engines = ROOT / "services" / "chat" / "engines"
    for module in engines.glob("*.py"):
        text = module.read_text()
        for other in ("llama_cpp", "tensorrt_llm", "llama_context"):
            if module.stem != other and not (module.stem == "llama_cpp" and other == "llama_context"):
                assert f"services.chat.engines.{other}" not in text or module.stem == "__init__", (module, other)


# -- the real release, where it is installed -------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(
    not (HAS_TRTLLM and HAS_GPU and os.environ.get("ARK_TRTLLM_CHAT_CHECKPOINT")),
    reason="needs the tensorrt_llm package, an NVIDIA GPU and $ARK_TRTLLM_CHAT_CHECKPOINT (a Hugging Face folder)",
)
async def test_tensorrt_llm_generates():  # pragma: no cover - GPU only
    events = await _collect(_real_generator(), _request("What is the capital of France?", sampling=Sampling(0.0)))
    assert "Paris" in _text(events)


def _real_generator():  # pragma: no cover - GPU only
    from services.chat.engines import create_engine
    from services.chat.generator import Generator

    model = ModelConfig(id="m", capability="chat", engine="tensorrt_llm", path=os.environ["ARK_TRTLLM_CHAT_CHECKPOINT"])
    return Generator(create_engine(model), max_queue=4)


@pytest.mark.gpu
@pytest.mark.skipif(
    not (HAS_TRTLLM and HAS_GPU and os.environ.get("ARK_TRTLLM_CHAT_CHECKPOINT")),
    reason="needs the tensorrt_llm package, an NVIDIA GPU and $ARK_TRTLLM_CHAT_CHECKPOINT (a Hugging Face folder)",
)
async def test_tensorrt_llm_n_2_ends_each_choice_and_repeats_no_token():  # pragma: no cover - GPU only
    """Findings 1 and 2 on the real release: with `n: 2`, each choice streams each of its tokens once (what was
    streamed equals the request's final `token_ids`) and ends on its own, also when it ends before the other (1.2.1
    sets `finish_reason` only once both have ended). The stub settles this on CPU only as far as it copies
    result.py; this run settles it."""
    from services.chat.engines.base import EngineRun, SequenceEnd, TokenSample

    generator = _real_generator()
    engine = generator.engine
    results = []
    generate_async = engine._llm.generate_async

    def spy(*args, **kwargs):
        results.append(generate_async(*args, **kwargs))
        return results[-1]

    engine._llm.generate_async = spy
    prompt = engine.encode_prompt([{"role": "user", "content": "Write one sentence about the sea."}])
    unequal = 0
    for _ in range(10):  # sampled lengths differ from run to run: some runs end one choice first
        job = EngineRun(prompt=prompt, sampling=Sampling(temperature=1.0), max_new_tokens=64, n=2)
        events = [e async for e in engine.run(job)]
        final = {o.index: [t for t in o.token_ids if not engine.is_eog(t)] for o in results[-1].outputs}
        for index in (0, 1):
            assert [e.index for e in events if isinstance(e, SequenceEnd)].count(index) == 1
            streamed = [e.token for e in events if isinstance(e, TokenSample) and e.index == index]
            assert [t for t in streamed if not engine.is_eog(t)] == final[index], "each token streamed once"
        unequal += len(final[0]) != len(final[1])
    assert unequal, "no run ended its two choices at different steps: the early end was not exercised"
    events = await _collect(generator, _request("Write one sentence about the sea.", sampling=Sampling(1.0, n=2)))
    assert sorted(e.choice_index for e in events if isinstance(e, Finished)) == [0, 1]
