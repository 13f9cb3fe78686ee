"""Silence is cut out before Whisper sees it, whether or not the client asked for `chunking_strategy`."""

from __future__ import annotations

from services.transcription.domain import DecodeOptions, VoiceActivity
from services.transcription.engines.faster_whisper import FasterWhisperSettings, transcribe_kwargs


def test_voice_activity_detection_is_on_by_default():
    kwargs = transcribe_kwargs(FasterWhisperSettings(), DecodeOptions(language="en"))
    assert kwargs["vad_filter"] is True
    assert "vad_parameters" not in kwargs  # the engine's defaults


def test_a_clients_server_vad_parameters_still_apply():
    options = DecodeOptions(language="en", voice_activity=VoiceActivity(threshold=0.7, silence_duration_ms=900))
    kwargs = transcribe_kwargs(FasterWhisperSettings(), options)
    assert kwargs["vad_filter"] is True
    assert kwargs["vad_parameters"].threshold == 0.7 and kwargs["vad_parameters"].min_silence_duration_ms == 900


def test_it_can_be_switched_off_in_the_configuration():
    kwargs = transcribe_kwargs(FasterWhisperSettings(vad_filter=False), DecodeOptions(language="en"))
    assert kwargs["vad_filter"] is False
