"""Every service starts and fails the same way (services/common/runner.py): a configuration error is one line per
bad field, prefixed with the service's name, without a traceback, and exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.stack import ROOT

BAD = """
models:
  - {id: chat, capability: chat, engine: llama_cpp, path: /x, settings: {n_threads: 0}}
"""


@pytest.mark.parametrize("service", ["chat", "embeddings", "transcription", "sessions"])
def test_a_configuration_error_is_one_line_naming_the_field_and_exit_status_2(service, tmp_path):
    config = tmp_path / "ark.yaml"
    config.write_text(BAD)
    done = subprocess.run(
        [sys.executable, "-m", f"services.{service}", "--config", str(config), "--address", "127.0.0.1:0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        f"{service}: invalid configuration in {config}:",
        "  models[chat].settings.n_threads: a positive number of threads or 'auto'",
    ]


def test_a_check_of_the_service_itself_names_its_field_too(tmp_path):
    config = tmp_path / "ark.yaml"
    config.write_text(
        "models: [{id: w, capability: transcription, engine: faster_whisper, path: /x}]\n"
        "limits: {max_audio_bytes: 40000000}\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "services.transcription", "--config", str(config), "--address", "127.0.0.1:0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("transcription: limits.max_audio_bytes (40000000) must stay below")
