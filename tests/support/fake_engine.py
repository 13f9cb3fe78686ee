"""A fake chat engine below the engine line: one character per token, a transparent template, scripted replies.

The generation layer's unit tests and the worker-pool tests run against it, so each assertion can name the exact
tokens the layer should have sent or kept. It follows the engine contract of services/chat/engines/base.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.chat.domain import GenerationRequest, Message, Role, Sampling
from services.chat.engines.base import ChatEngine, EndReason, EngineRun, PromptReuse, SequenceEnd, TokenSample
from services.common.errors import UnsupportedParameterError

EOG = 1


@dataclass
class FakeContext:
    tokens: list[int] = field(default_factory=list)


class FakeEngine(ChatEngine):
    """Characters are tokens; `<|end|>` closes a turn; replies come from `script(prompt_text, index)`."""

    model_id = "fake"
    context_window = 400
    vocab_size = 1000
    eog_token = EOG
    context_slots = 2

    def __init__(self, script: Callable[[str, int], str] = lambda prompt, index: "Hello!") -> None:
        self.script = script
        self.runs: list[EngineRun] = []
        self.scratch = FakeContext()
        self.aborted = asyncio.Event()
        self.hold: asyncio.Event | None = None  # when set, each token waits for it
        self.refuse: str = ""

    def render(self, messages: Sequence[dict[str, Any]], *, open_turn: bool = True) -> str:
        text = "".join(f"<{m['role']}>{m['content']}<|end|>" for m in messages)
        return text + ("<assistant>" if open_turn else "")

    def tokenize(self, text: str) -> list[int]:
        out, i = [], 0
        while i < len(text):
            if text.startswith("<|end|>", i):
                out.append(EOG)
                i += len("<|end|>")
            else:
                out.append(ord(text[i]))
                i += 1
        return out

    def encode_prompt(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        return self.tokenize(self.render(messages))

    def is_eog(self, token: int) -> bool:
        return token == EOG

    def validate(self, request: GenerationRequest) -> None:
        if self.refuse:
            raise UnsupportedParameterError(self.refuse, param="n")

    def new_context(self) -> FakeContext:
        return FakeContext()

    def reset_context(self, context: FakeContext) -> None:
        context.tokens = []

    def context_tokens(self, context: FakeContext) -> Sequence[int]:
        return context.tokens

    async def run(self, job: EngineRun) -> AsyncIterator:
        self.runs.append(job)
        context = job.context if job.context is not None else self.scratch
        if job.context is None:
            context.tokens = []
        prefix = 0
        for a, b in zip(context.tokens, job.prompt, strict=False):
            if a != b:
                break
            prefix += 1
        yield PromptReuse(min(prefix, len(job.prompt) - 1))
        prompt_text = "".join(chr(t) if t != EOG else "<|end|>" for t in job.prompt)
        try:
            for index in range(job.n):
                produced: list[int] = []
                reply = [ord(c) for c in self.script(prompt_text, index)] + [EOG]
                reason = EndReason.LENGTH
                for token in reply:
                    if index in job.stopped:
                        reason = EndReason.STOPPED
                        break
                    if self.hold is not None:
                        await self.hold.wait()
                    await asyncio.sleep(0)
                    produced.append(token)
                    context.tokens = [*job.prompt, *produced[:-1]]  # the last sampled token is not evaluated yet
                    yield TokenSample(
                        index,
                        token,
                        chr(token).encode() if token != EOG else b"",
                        -0.5 if job.sampling.logprobs else None,
                    )
                    if token == EOG:
                        reason = EndReason.EOG
                        break
                    if len(produced) >= job.max_new_tokens:
                        break
                yield SequenceEnd(index, reason)
        finally:
            if job.abort.is_set() and not all(i in job.stopped for i in range(job.n)):
                self.aborted.set()


def request(
    text: str = "Hi", *, history: tuple[Message, ...] = (), session: str = "", key: str = "k1", **kw
) -> GenerationRequest:
    sampling = kw.pop("sampling", Sampling(temperature=0.0))
    return GenerationRequest(
        "r",
        "fake",
        (Message(Role.SYSTEM, "S"), *history, Message(Role.USER, text)),
        sampling,
        session_id=session,
        api_key_hash=key,
        idle_timeout=60,
        **kw,
    )
