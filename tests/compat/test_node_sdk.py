"""The official OpenAI Node SDK (npm `openai`, pinned in tests/compat/node/package-lock.json) against the real stack:
chat, streaming, embeddings, transcription and error classes (tests/compat/node/sdk.test.mjs)."""

from __future__ import annotations

import pytest

from tests.compat.conftest import run_node_tests

pytestmark = pytest.mark.e2e


def test_node_sdk(stack):
    run_node_tests(stack, "sdk.test.mjs")
