"""Fixtures shared by the whole suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.stack import RunningStack, start_stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """The whole stack as separate processes on the embedded default models, shared by the e2e tests."""
    running = start_stack(tmp_path_factory.mktemp("stack-logs"))
    yield running
    code = running.stop()
    assert code == 0, "ark up did not exit cleanly:\n" + "".join(running.output[-30:])


@pytest.fixture(scope="session")
def client(stack: RunningStack):
    import openai

    with openai.OpenAI(base_url=stack.base_url, api_key=stack.api_key, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture
async def async_client(stack: RunningStack):
    import openai

    async with openai.AsyncOpenAI(base_url=stack.base_url, api_key=stack.api_key, max_retries=0, timeout=120) as c:
        yield c
