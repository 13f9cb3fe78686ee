"""The TensorRT-LLM Whisper engine is imported lazily and runs only where tensorrt_llm and an NVIDIA GPU exist."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import sys

import pytest

from services.common.config import ModelConfig

HAS_TRTLLM = importlib.util.find_spec("tensorrt_llm") is not None
HAS_GPU = shutil.which("nvidia-smi") is not None
HAS_ENGINE = bool(os.environ.get("ARK_TRTLLM_WHISPER_ENGINE") and os.environ.get("ARK_TRTLLM_WHISPER_ASSETS"))


def test_importing_the_engine_module_does_not_import_tensorrt_llm():
    importlib.import_module("services.transcription.engines.tensorrt_llm")
    assert HAS_TRTLLM or "tensorrt_llm" not in sys.modules


def test_selecting_tensorrt_llm_without_it_fails_clearly():
    if HAS_TRTLLM:
        pytest.skip("tensorrt_llm is installed here")
    from services.common.errors import UnavailableError
    from services.transcription.engines import create_engine

    model = ModelConfig(id="w", capability="transcription", engine="tensorrt_llm", path="/nonexistent")
    with pytest.raises(UnavailableError, match="tensorrt-llm"):
        create_engine(model)


@pytest.mark.gpu
@pytest.mark.skipif(
    not (HAS_TRTLLM and HAS_GPU and HAS_ENGINE),
    reason="needs the tensorrt_llm package, an NVIDIA GPU and a Whisper engine built with trtllm-build "
    "($ARK_TRTLLM_WHISPER_ENGINE, assets in $ARK_TRTLLM_WHISPER_ASSETS)",
)
async def test_tensorrt_llm_transcribes_speech():  # pragma: no cover - GPU only
    from services.common.config import LimitsConfig
    from services.transcription.domain import Finished, TranscriptionRequest
    from services.transcription.engines import create_engine
    from services.transcription.transcriber import Transcriber
    from tests.support.audio import SPEECH, word_error_rate

    model = ModelConfig(
        id="w",
        capability="transcription",
        engine="tensorrt_llm",
        path=os.environ["ARK_TRTLLM_WHISPER_ENGINE"],
        settings={"assets_dir": os.environ["ARK_TRTLLM_WHISPER_ASSETS"]},
    )
    transcriber = Transcriber(create_engine(model), LimitsConfig())
    events = [e async for e in transcriber.transcribe(TranscriptionRequest("r", "w", SPEECH.data()))]
    finished = events[-1]
    assert isinstance(finished, Finished)
    assert word_error_rate(SPEECH.reference, finished.text) <= 0.1


# -- on CPU: the decoder budget and language detection, with a fake runner below the engine ------------------------


def _settings(max_new_tokens: int = 224):
    from services.transcription.engines.tensorrt_llm import TensorRTLLMWhisperSettings

    return TensorRTLLMWhisperSettings(assets_dir="/nonexistent", max_new_tokens=max_new_tokens)


@pytest.mark.parametrize("text_tokens", [0, 1, 100, 222, 223, 224, 300, 1000])
@pytest.mark.parametrize("max_new_tokens", [1, 100, 224])
def test_prompt_and_new_tokens_fit_whispers_448_positions(text_tokens, max_new_tokens):
    from services.transcription.engines.tensorrt_llm import DecoderLimits

    limits = DecoderLimits.from_config({"max_position_embeddings": 448, "max_seq_len": 448, "max_input_len": 448})
    prompt = [50361, *range(1000, 1000 + text_tokens)] if text_tokens else []
    prefix = [50258, 50259, 50359, 50363]
    decoder_input, budget = limits.fit(prompt, prefix, _settings(max_new_tokens))
    assert len(decoder_input) + budget <= 448
    assert decoder_input[-4:] == prefix and budget >= 1
    kept = len(decoder_input) - len(prefix) - (1 if text_tokens else 0)
    assert kept == min(text_tokens, 223), "the previous text keeps its last 223 tokens, as Whisper does"
    if text_tokens:
        assert decoder_input[0] == 50361 and decoder_input[len(prefix) - 4 + kept] == 1000 + text_tokens - 1


def test_an_engine_built_like_tensorrt_llms_example_bounds_the_prompt_and_the_output():
    """The example builds the decoder with --max_input_len 14 --max_seq_len 114."""
    from services.transcription.engines.tensorrt_llm import DecoderLimits

    limits = DecoderLimits.from_config({"max_position_embeddings": 448, "max_seq_len": 114, "max_input_len": 14})
    prefix = [50258, 50259, 50359, 50363]
    decoder_input, budget = limits.fit([50361, *range(1000, 1050)], prefix, _settings())
    assert decoder_input == [50361, *range(1041, 1050), *prefix] and len(decoder_input) == 14
    assert budget == 100
    tight = DecoderLimits.from_config({"max_seq_len": 114, "max_input_len": 5})
    assert tight.fit([50361, 1000, 1001], prefix, _settings())[0] == prefix, "no room: the prompt is dropped whole"


RUNNER = "tensorrt_llm.runtime:ModelRunnerCpp"


def test_the_runner_is_opened_with_arguments_the_release_has():
    from services.transcription.engines.tensorrt_llm import runner_options
    from tests.support.trtllm_stub import check_call

    options = runner_options(_settings())
    assert check_call(RUNNER, "from_dir", ("/engines/whisper",), options)["is_enc_dec"] is True


class _FakeRunner:
    """ModelRunnerCpp.generate's contract: output_ids hold the input, then the generated tokens. Arguments are
    checked against the recorded 1.2.1 signature (tests/support/trtllm_api.json)."""

    def __init__(self, next_token: int) -> None:
        self.next_token = next_token
        self.calls: list[dict] = []

    def generate(self, *args, **kwargs):
        import torch

        from tests.support.trtllm_stub import check_call

        kwargs = check_call(RUNNER, "generate", args, kwargs)
        self.calls.append(kwargs)
        prompt = kwargs["batch_input_ids"][0].tolist()
        ids = prompt + [self.next_token] * kwargs["max_new_tokens"]
        return {"output_ids": torch.tensor([[ids]]), "sequence_lengths": torch.tensor([[len(ids)]])}


def _multilingual_engine(next_token_name: str):
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    from services.transcription.engines.tensorrt_llm import _SPECIAL, TensorRTLLMWhisperEngine

    # Whisper's order: text tokens, then <|endoftext|>, <|startoftranscript|>, the languages, the task tokens.
    names = ["hello", "<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|de|>", "<|fr|>", "<|transcribe|>"]
    names += ["<|startofprev|>", "<|notimestamps|>"]
    tokenizer = Tokenizer(WordLevel({name: i for i, name in enumerate(names)}, unk_token="hello"))
    engine = object.__new__(TensorRTLLMWhisperEngine)
    engine._torch, engine._device, engine._tokenizer = torch, "cpu", tokenizer
    engine._settings = _settings()
    engine._special = {name: tokenizer.token_to_id(f"<|{name}|>") for name in _SPECIAL}
    engine._runner = _FakeRunner(tokenizer.token_to_id(next_token_name))
    return engine


@pytest.mark.parametrize(("token", "language"), [("<|de|>", "de"), ("<|fr|>", "fr"), ("<|en|>", "en")])
def test_language_detection_reads_the_language_token_after_startoftranscript(token, language):
    import torch

    engine = _multilingual_engine(token)
    assert engine._detect_language(torch.zeros(80, 3000)) == language
    (call,) = engine._runner.calls
    assert call["batch_input_ids"][0].tolist() == [engine._special["startoftranscript"]] and call["max_new_tokens"] == 1


def test_language_detection_falls_back_to_english_on_a_token_that_is_no_language():
    import torch

    assert _multilingual_engine("hello")._detect_language(torch.zeros(80, 3000)) == "en"


def test_transcripts_still_drop_special_tokens():
    import torch

    engine = _multilingual_engine("<|de|>")
    assert engine._generate([engine._special["startoftranscript"]], torch.zeros(80, 3000), 3) == []
