"""Every script in examples/ runs against the real stack and exits cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.py"))
SHARED_AUDIO = Path(__file__).resolve().parents[3] / "shared" / "data" / "jfk.flac"

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(stack, script):
    if script.stem.startswith("transcription") and not SHARED_AUDIO.exists():
        pytest.skip("../shared/data/jfk.flac is absent (it lives beside the checkout)")
    env = {**os.environ, "ARK_BASE_URL": stack.base_url, "ARK_API_KEY": stack.api_key}
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip()
