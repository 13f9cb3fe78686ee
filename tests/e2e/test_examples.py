"""Every script in examples/ runs against the real stack and exits cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.audio import SPEECH

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.py"))

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(stack, script):
    # The transcription example takes the file to transcribe as its argument: the suite's recorded speech.
    audio = [str(SPEECH.path)] if script.stem.startswith("transcription") else []
    env = {**os.environ, "ARK_BASE_URL": stack.base_url, "ARK_API_KEY": stack.api_key}
    result = subprocess.run([sys.executable, str(script), *audio], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip()
    if audio:
        assert SPEECH.keyword.lower() in result.stdout.lower(), result.stdout
