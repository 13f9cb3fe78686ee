"""The official OpenAI Node SDK's tools and structured output (zod) against the real stack
(tests/compat/node/tools.test.mjs)."""

from __future__ import annotations

import pytest

from tests.compat.conftest import run_node_tests

pytestmark = pytest.mark.e2e


def test_node_sdk_tools_and_zod(stack):
    run_node_tests(stack, "tools.test.mjs")
