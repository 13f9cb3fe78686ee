"""Where the registry keeps sessions and worker leases. In memory by default; the interface is what a shared store
(Redis, a database) would implement to run several registry replicas."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass(slots=True)
class WorkerRecord:
    name: str
    address: str
    models: tuple[str, ...]
    session_capacity: int
    lease_expires_at: float


@dataclass(slots=True)
class SessionRecord:
    id: str
    api_key_hash: str
    model: str
    worker_name: str
    worker_address: str
    created_at: float
    last_used_at: float


class SessionStore(ABC):
    @abstractmethod
    def put_worker(self, worker: WorkerRecord) -> None: ...

    @abstractmethod
    def workers(self) -> list[WorkerRecord]: ...

    @abstractmethod
    def put_session(self, session: SessionRecord) -> None: ...

    @abstractmethod
    def get_session(self, session_id: str) -> SessionRecord | None: ...

    @abstractmethod
    def delete_session(self, session_id: str) -> SessionRecord | None: ...

    @abstractmethod
    def sessions(self) -> list[SessionRecord]: ...


class InMemorySessionStore(SessionStore):
    def __init__(self) -> None:
        self._workers: dict[str, WorkerRecord] = {}
        self._sessions: dict[str, SessionRecord] = {}

    def put_worker(self, worker: WorkerRecord) -> None:
        self._workers[worker.name] = worker

    def workers(self) -> list[WorkerRecord]:
        return list(self._workers.values())

    def put_session(self, session: SessionRecord) -> None:
        self._sessions[session.id] = session

    def get_session(self, session_id: str) -> SessionRecord | None:
        return self._sessions.get(session_id)

    def delete_session(self, session_id: str) -> SessionRecord | None:
        return self._sessions.pop(session_id, None)

    def sessions(self) -> list[SessionRecord]:
        return list(self._sessions.values())
