"""Serving logic for chat completions: one generation stream, rendered as a JSON body or as SSE chunks."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.types import Receive

from ark.chat.v1 import chat_service_pb2 as pb
from edge import sse
from edge.catalog import Catalog
from edge.chat import translate
from edge.chat.schemas import ChatCompletionRequest
from edge.clients.chat_workers import ChatStream, ChatWorkers, WorkerUnavailableError
from edge.compat import CHAT_COMPLETIONS, apply_policy
from edge.sessions.conversation import conversation_key
from edge.sessions.placement import Placement, SessionPlacer
from services.common.config import Capability, LimitsConfig
from services.common.errors import ArkError, InternalError

log = logging.getLogger(__name__)

DEFAULT_KEEPALIVE_SECONDS = 10.0


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
    usage_every_chunk: bool
    ark_metadata: bool
    keepalive_seconds: float
    session_mode: str
    # Names the conversation within the API key, for placement (edge/sessions/conversation.py).
    conversation_key: str = ""


@dataclass(frozen=True, slots=True)
class Running:
    """A generation that has started on a worker, and the session it runs in (None: stateless)."""

    stream: ChatStream
    session: Placement | None


@dataclass
class _Choice:
    """One choice being assembled from the stream."""

    text: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    calls: dict[int, dict[str, Any]] = field(default_factory=dict)  # tool calls by index, as they assemble
    finish_reason: str | None = None

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(self.text) if not self.calls else None,
            "refusal": None,
            "annotations": [],
        }
        if self.calls:
            message["tool_calls"] = [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["name"], "arguments": "".join(call["arguments"])},
                }
                for _, call in sorted(self.calls.items())
            ]
        return message


T = TypeVar("T")


async def _disconnect(receive: Receive) -> None:
    """Return when the client disconnects (the body is already read: the server has nothing else to deliver)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(work: Coroutine[Any, Any, T], receive: Receive, cancel: Callable[[], None]) -> T | None:
    """`work`'s result, or None if the client of a non-streaming request disconnects first; then `work` is
    cancelled and `cancel` is called (it cancels the worker's call, which aborts the generation within a token).

    Starlette does not cancel a handler whose client went away; without this a generation would run to its end
    for nobody.
    """
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            cancel()
    if not task.done() or task.cancelled():
        return None
    return task.result()


def _finish(finished: pb.GenerationFinished) -> str:
    return translate.FINISH_REASONS.get(finished.finish_reason, "stop")


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
        keepalive = body.stream_keepalive_seconds
        return Prepared(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=model.id,
            fingerprint=translate.fingerprint(model),
            request=request,
            ignored_params=ignored,
            include_usage=include_usage or bool(body.stream_usage_every_chunk),
            usage_every_chunk=bool(body.stream_usage_every_chunk),
            ark_metadata=bool(body.ark_metadata),
            keepalive_seconds=DEFAULT_KEEPALIVE_SECONDS if keepalive is None else keepalive,
            session_mode=body.session or "auto",
            conversation_key=conversation_key(body.messages, body.prompt_cache_key),
        )

    async def start(self, job: Prepared, session_cookie: str | None) -> Running:
        """Place the request (session or not) and start generating; errors before the first token raise here."""
        api_key_hash = job.request.session.api_key_hash
        placement = None
        if job.session_mode != "none":
            cookie = None if job.session_mode == "new" else session_cookie
            placement = await self._place(
                lambda soonest: self._sessions.place(cookie, api_key_hash, job.model, job.conversation_key, soonest)
            )
        if placement is None:
            return Running(await self._workers.open_stream(job.request), None)
        try:
            return Running(await self._open_in_session(job, placement), placement)
        except WorkerUnavailableError:
            # The pinned worker is gone: re-place before any byte is sent; the new worker recomputes.
            failed = placement
            placement = await self._place(lambda soonest: self._sessions.replace(failed, api_key_hash, soonest))
            if placement is not None:
                try:
                    return Running(await self._open_in_session(job, placement), placement)
                except WorkerUnavailableError:
                    pass  # the new worker is out too: session infrastructure never fails a request
            job.request.session.session_id = ""
            job.request.session.conversation_key = ""
            # The failed attempt on the pinned worker was this request's one retry.
            return Running(await self._workers.open_stream(job.request, retry=False), None)

    async def _place(self, ask: Callable[[list[str]], Awaitable[Placement | None]]) -> Placement | None:
        """Ask the registry for a placement, naming the worker that would start it soonest; that worker (or the one
        the registry chose instead) counts the request as promised until its call starts (ChatWorkers.placed)."""
        soonest = self._workers.soonest()
        placement = None
        try:
            placement = await ask(soonest)
        finally:
            self._workers.placed(soonest, placement.worker_address if placement is not None else None)
        return placement

    async def _open_in_session(self, job: Prepared, placement: Placement) -> ChatStream:
        job.request.session.session_id = placement.session_id
        job.request.session.idle_timeout_seconds = self._sessions.policy.idle_timeout_seconds
        job.request.session.conversation_key = placement.conversation_key
        return await self._workers.open_stream(job.request, address=placement.worker_address)

    def _ark(self, running: Running, finished: pb.GenerationFinished) -> dict[str, Any]:
        """ARK's metadata extension: what was reused, where, and how long it took."""
        session = None if running.session is None else ("new" if running.session.is_new else "resumed")
        t = finished.timings
        return {
            "cached_tokens": finished.usage.cached_tokens,
            # Where the reused state was: resident (a live context), host or disk (restored); null when none was.
            "state_tier": running.stream.started.state_tier or None,
            "session": session,
            "timings": {
                "queue_seconds": round(t.queue_seconds, 6),
                "time_to_first_token_seconds": round(t.time_to_first_token_seconds, 6),
                "decode_seconds": round(t.decode_seconds, 6),
            },
        }

    async def complete(self, job: Prepared, running: Running, receive: Receive | None = None) -> dict[str, Any] | None:
        """Run to the end and return a `chat.completion` object; None if the client went away first.

        With the request's ASGI `receive`, the client's connection is watched while the worker generates: a client
        that disconnects gets its generation cancelled (the worker aborts it within one token) rather than left
        running for nobody.
        """
        if receive is None:
            return await self._complete(job, running)
        completion = await unless_disconnected(self._complete(job, running), receive, running.stream.cancel)
        if completion is None:
            log.info("request %s: the client went away; generation cancelled", job.request.request_id)
        return completion

    async def _complete(self, job: Prepared, running: Running) -> dict[str, Any]:
        choices: dict[int, _Choice] = {}
        try:
            async for message in running.stream:
                kind = message.WhichOneof("event")
                if kind == "delta":
                    d = message.delta
                    choice = choices.setdefault(d.choice_index, _Choice())
                    choice.text.append(d.text)
                    choice.logprobs += translate.logprobs_to_json(d.logprobs)
                    for call in d.tool_calls:
                        assembled = choice.calls.setdefault(call.index, {"id": "", "name": "", "arguments": []})
                        assembled["id"] = assembled["id"] or call.id
                        assembled["name"] = assembled["name"] or call.function_name
                        assembled["arguments"].append(call.arguments_delta)
                elif kind == "finished":
                    f = message.finished
                    choices.setdefault(f.choice_index, _Choice()).finish_reason = _finish(f)
                    if not f.more_choices:
                        return self._completion(job, running, choices, f)
        finally:
            running.stream.cancel()
        raise InternalError("The chat worker ended the stream without finishing.")

    def _completion(
        self, job: Prepared, running: Running, choices: dict[int, _Choice], last: pb.GenerationFinished
    ) -> dict[str, Any]:
        logprobs_wanted = job.request.sampling.logprobs
        body: dict[str, Any] = {
            "id": job.id,
            "object": "chat.completion",
            "created": job.created,
            "model": job.model,
            "choices": [
                {
                    "index": i,
                    "message": c.message(),
                    "logprobs": {"content": c.logprobs, "refusal": None} if logprobs_wanted else None,
                    "finish_reason": c.finish_reason or "stop",
                }
                for i, c in sorted(choices.items())
            ],
            "usage": translate.usage_to_json(last.usage),
            "service_tier": "default",
            "system_fingerprint": job.fingerprint,
        }
        if job.ark_metadata:
            body["ark"] = self._ark(running, last)
        return body

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
        logprobs_wanted = job.request.sampling.logprobs
        prompt_tokens = call.started.prompt_tokens
        cached_tokens = call.started.cached_tokens
        generated = 0
        opened: set[int] = set()

        def chunk(index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> bytes:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            payload = {**base, "choices": [choice]}
            if job.usage_every_chunk:
                payload["usage"] = translate.usage_to_json(
                    pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=generated, cached_tokens=cached_tokens)
                )
            return sse.frame(payload)

        def open_choice(index: int) -> bytes | None:
            if index in opened:
                return None
            opened.add(index)
            return chunk(index, {"role": "assistant", "content": "", "refusal": None})

        try:
            yield open_choice(0)
            async for message in self._with_keepalive(call, job.keepalive_seconds):
                if message is None:
                    yield sse.KEEPALIVE
                    continue
                kind = message.WhichOneof("event")
                if kind == "delta":
                    d = message.delta
                    generated += len(d.token_ids)
                    if (first := open_choice(d.choice_index)) is not None:
                        yield first
                    logprobs = (
                        {"content": translate.logprobs_to_json(d.logprobs), "refusal": None}
                        if logprobs_wanted and d.logprobs
                        else None
                    )
                    if d.tool_calls:
                        # One chunk per call delta, as OpenAI streams them: a call's first (index, id, type, name,
                        # empty arguments), then its argument fragments with the index only.
                        for c in d.tool_calls:
                            call_delta: dict[str, Any] = {"index": c.index}
                            if c.id:
                                call_delta |= {
                                    "id": c.id,
                                    "type": "function",
                                    "function": {"name": c.function_name, "arguments": c.arguments_delta},
                                }
                            else:
                                call_delta["function"] = {"arguments": c.arguments_delta}
                            yield chunk(d.choice_index, {"tool_calls": [call_delta]}, logprobs=logprobs)
                            logprobs = None
                    elif d.text or logprobs:
                        yield chunk(d.choice_index, {"content": d.text}, logprobs=logprobs)
                elif kind == "finished":
                    f = message.finished
                    generated = f.usage.completion_tokens
                    last = chunk(f.choice_index, {}, _finish(f))
                    if f.more_choices:
                        yield last
                        continue
                    if job.ark_metadata and not job.include_usage:
                        payload = json.loads(last[6:])
                        payload["ark"] = self._ark(running, f)
                        last = sse.frame(payload)
                    yield last
                    if job.include_usage:
                        final = {**base, "choices": [], "usage": translate.usage_to_json(f.usage)}
                        if job.ark_metadata:
                            final["ark"] = self._ark(running, f)
                        yield sse.frame(final)
                    yield sse.DONE
                    return
            raise InternalError("The chat worker ended the stream without finishing.")
        except ArkError as exc:
            yield sse.frame(exc.to_dict())
        finally:
            # Runs on client disconnect too (the task is cancelled): cancelling the call aborts generation.
            call.cancel()

    @staticmethod
    async def _with_keepalive(
        call: ChatStream, interval: float
    ) -> AsyncIterator[pb.StreamGenerateChatCompletionResponse | None]:
        """The stream's messages; None whenever `interval` passes with nothing to send before the first output
        (a long prompt is being processed), so proxies and clients do not time the connection out."""
        messages = aiter(call)
        if interval > 0:
            first = asyncio.ensure_future(anext(messages, None))
            try:
                while not (await asyncio.wait({first}, timeout=interval))[0]:
                    yield None
            finally:
                if not first.done():
                    first.cancel()
            message = first.result()
            if message is None:
                return
            yield message
        async for message in messages:
            yield message
