"""The narrow interface every chat engine implements (llama.cpp on CPU, TensorRT-LLM on GPU).

The service depends on this ABC only, so engines can be swapped by configuration and the serving logic can be
tested against a fake.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass

from services.chat.domain import GenerationEvent, GenerationRequest


@dataclass(frozen=True, slots=True)
class EngineStatus:
    session_capacity: int
    resident_sessions: int
    queued_requests: int


class ChatEngine(ABC):
    """Generates chat completions for one model."""

    model_id: str

    @abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Stream `Started`, then `Delta`s, then `Finished`.

        Raises ArkError subclasses for bad input (before `Started`) or overload. Cancelling the iteration (closing
        the generator, or cancelling the task consuming it) aborts the computation promptly.
        """

    @abstractmethod
    async def drop_session(self, session_id: str) -> bool:
        """Free the resident state of a session; True if there was any."""

    def expire_idle(self) -> int:
        """Drop resident session state idle past its timeout; returns how many sessions were dropped."""
        return 0

    @abstractmethod
    def status(self) -> EngineStatus:
        """Capacity and load, for placement and metrics."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release engine resources."""
