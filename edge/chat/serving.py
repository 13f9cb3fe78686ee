"""Serving logic for chat completions: one generation stream, rendered as a JSON body or as SSE chunks."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc

from ark.chat.v1 import chat_service_pb2 as pb
from edge.backends import ChatStream, ChatWorkers, WorkerUnavailableError
from edge.catalog import Catalog
from edge.chat import translate
from edge.chat.schemas import ChatCompletionRequest
from edge.compat import CHAT_COMPLETIONS, apply_policy
from edge.sessions.placement import Placement, SessionPlacer
from services.common.config import Capability, LimitsConfig
from services.common.errors import ArkError, InternalError
from services.common.grpc_errors import from_rpc_error

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Prepared:
    """A validated request, ready to run."""

    id: str
    created: int
    model: str
    fingerprint: str
    request: pb.StreamGenerateChatCompletionRequest
    ignored_params: list[str]
    include_usage: bool


@dataclass(frozen=True, slots=True)
class Running:
    """A generation that has started on a worker, and the session it runs in (None: stateless)."""

    stream: ChatStream
    session: Placement | None


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class ChatCompletions:
    def __init__(self, catalog: Catalog, workers: ChatWorkers, sessions: SessionPlacer, limits: LimitsConfig) -> None:
        self._catalog = catalog
        self._workers = workers
        self._sessions = sessions
        self._limits = limits

    def prepare(self, body: ChatCompletionRequest, *, request_id: str, api_key_hash: str) -> Prepared:
        model = self._catalog.resolve(body.model, Capability.CHAT)
        ignored = apply_policy(CHAT_COMPLETIONS, body)
        request = translate.request_to_proto(
            body, model_id=model.id, request_id=request_id, api_key_hash=api_key_hash, limits=self._limits
        )
        include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
        return Prepared(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=model.id,
            fingerprint=translate.fingerprint(model),
            request=request,
            ignored_params=ignored,
            include_usage=include_usage,
        )

    async def start(self, job: Prepared, session_cookie: str | None) -> Running:
        """Place the request (session or not) and start generating; errors before the first token raise here."""
        api_key_hash = job.request.session.api_key_hash
        placement = await self._sessions.place(session_cookie, api_key_hash, job.model)
        if placement is None:
            return Running(await self._workers.open_stream(job.request), None)
        try:
            return Running(await self._open_in_session(job, placement), placement)
        except WorkerUnavailableError:
            # The pinned worker is gone: re-place before any byte is sent; the new worker recomputes.
            placement = await self._sessions.replace(placement, api_key_hash)
            if placement is None:
                job.request.session.session_id = ""
                return Running(await self._workers.open_stream(job.request), None)
            return Running(await self._open_in_session(job, placement), placement)

    async def _open_in_session(self, job: Prepared, placement: Placement) -> ChatStream:
        job.request.session.session_id = placement.session_id
        job.request.session.idle_timeout_seconds = self._sessions.policy.idle_timeout_seconds
        return await self._workers.open_stream(job.request, address=placement.worker_address)

    async def complete(self, job: Prepared, running: Running) -> dict[str, Any]:
        """Run to the end and return a `chat.completion` object."""
        call = running.stream
        text: list[str] = []
        try:
            async for message in call:
                kind = message.WhichOneof("event")
                if kind == "delta":
                    text.append(message.delta.text)
                elif kind == "finished":
                    return self._completion(job, "".join(text), message.finished)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()
        raise InternalError("The chat worker ended the stream without finishing.")

    def _completion(self, job: Prepared, text: str, finished: pb.GenerationFinished) -> dict[str, Any]:
        return {
            "id": job.id,
            "object": "chat.completion",
            "created": job.created,
            "model": job.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None, "annotations": []},
                    "logprobs": None,
                    "finish_reason": translate.FINISH_REASONS.get(finished.finish_reason, "stop"),
                }
            ],
            "usage": translate.usage_to_json(finished.usage),
            "service_tier": "default",
            "system_fingerprint": job.fingerprint,
        }

    async def sse_events(self, job: Prepared, running: Running) -> AsyncIterator[bytes]:
        """The SSE body of a started generation."""
        call = running.stream
        base = {
            "id": job.id,
            "object": "chat.completion.chunk",
            "created": job.created,
            "model": job.model,
            "system_fingerprint": job.fingerprint,
        }
        if job.include_usage:
            base["usage"] = None

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return _sse({**base, "choices": [choice]})

        try:
            yield chunk({"role": "assistant", "content": "", "refusal": None})
            async for message in call:
                kind = message.WhichOneof("event")
                if kind == "delta":
                    if message.delta.text:
                        yield chunk({"content": message.delta.text})
                elif kind == "finished":
                    finished = message.finished
                    yield chunk({}, translate.FINISH_REASONS.get(finished.finish_reason, "stop"))
                    if job.include_usage:
                        yield _sse({**base, "choices": [], "usage": translate.usage_to_json(finished.usage)})
                    yield b"data: [DONE]\n\n"
                    return
            raise InternalError("The chat worker ended the stream without finishing.")
        except grpc.RpcError as exc:
            yield _sse(from_rpc_error(exc).to_dict())
        except ArkError as exc:
            yield _sse(exc.to_dict())
        finally:
            # Runs on client disconnect too (the task is cancelled): cancelling the call aborts generation.
            call.cancel()
