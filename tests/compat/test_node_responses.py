"""The Responses API from Node: the official SDK and the Vercel AI SDK (tests/compat/node/responses.test.mjs)."""

from __future__ import annotations

import pytest

from tests.compat.conftest import run_node_tests

pytestmark = pytest.mark.e2e


def test_node_responses(stack):
    run_node_tests(stack, "responses.test.mjs")
