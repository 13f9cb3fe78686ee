"""Serving logic of /v1/responses: a second door to ARK's chat conversations, not a second system.

A request becomes a chat generation (edge/responses/translate.py) run by the chat serving path: the same placement,
workers and constraint engine. What the Responses API adds is resolved here: the history of a
`previous_response_id`, `conversation` or `item_reference` (stored objects, kept by the session registry), and the
placement of a continuation on the worker holding its state. A stored response remembers the session and the
conversation key its chain runs under; a continuation presents that session, so the registry places it on the same
worker, and the worker continues from its own raw tokens (the history is rebuilt with exactly the text and tool calls
the worker produced), so `cached_tokens` covers the whole earlier chain.

One event generator serves both shapes: a JSON body is the stream's last response object. Once `response.created`
is sent, a failure is a `response.failed` event, never a cut stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.types import Receive

from edge.catalog import Catalog
from edge.chat.schemas import ChatMessageIn
from edge.chat.serving import DEFAULT_KEEPALIVE_SECONDS, ChatCompletions, Prepared, Running, unless_disconnected
from edge.chat.translate import FINISH_REASONS, fingerprint
from edge.clients.stored_objects import CONVERSATION, RESPONSE, RESPONSE_EVENTS, Stored, StoredObjects
from edge.compat import RESPONSES, apply_policy
from edge.responses import items as it
from edge.responses import translate
from edge.responses.background import TERMINAL, BackgroundRuns
from edge.responses.schemas import (
    ArgumentsDeltaEvent,
    ArgumentsDoneEvent,
    ContentPartEvent,
    CreateResponse,
    Event,
    IncompleteDetails,
    InputTokensDetails,
    OutputItemEvent,
    OutputTokensDetails,
    Response,
    ResponseError,
    ResponseEvent,
    ResponseUsage,
    TextDeltaEvent,
    TextDoneEvent,
)
from edge.sessions.conversation import conversation_key
from services.common.config import Capability, LimitsConfig
from services.common.errors import (
    ArkError,
    InternalError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    UnavailableError,
)

log = logging.getLogger(__name__)

_ROLE_NAMES = {v: k for k, v in it.ROLES.items()}


@dataclass
class Plan:
    """A validated Responses request with its history resolved, ready to run."""

    body: CreateResponse
    owner: str
    response: Response
    job: Prepared
    input_items: list[dict[str, Any]]
    session_id: str
    conversation_id: str | None
    ignored_params: list[str]
    logprobs: bool
    keepalive_seconds: float
    output: list[dict[str, Any]] = field(default_factory=list)
    # Why the generation failed after it started (a JSON body answers with this error, as chat does).
    failure: ArkError | None = None


def _unix() -> int:
    return int(time.time())


def _failure_code(err: ArkError) -> str:
    if isinstance(err, InvalidRequestError):
        return "invalid_prompt"
    if isinstance(err, OverloadedError):
        return "rate_limit_exceeded"
    return "server_error"


def _own_items(record: dict[str, Any]) -> list[dict[str, Any]]:
    """A stored response's own items: its input, then its finished output."""
    output = record.get("response", {}).get("output", [])
    return [*record.get("input", []), *(o for o in output if o.get("status") != "in_progress")]


def _echo_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "name": t.get("name"),
            "description": t.get("description"),
            "parameters": t.get("parameters"),
            "strict": bool(t.get("strict")),
        }
        for t in tools or []
    ]


class Responses:
    def __init__(
        self, catalog: Catalog, chat: ChatCompletions, stored: StoredObjects | None, limits: LimitsConfig
    ) -> None:
        self._catalog = catalog
        self._chat = chat
        self._stored = stored
        self._limits = limits
        self.background = BackgroundRuns(stored) if stored is not None else None

    def default_model(self) -> str:
        """The first configured chat model (input_tokens may leave `model` out)."""
        chat = [e.model.id for e in self._catalog.entries() if e.model.capability is Capability.CHAT]
        if not chat:
            raise InvalidRequestError("No chat model is configured.", param="model")
        return chat[0]

    @property
    def stored(self) -> StoredObjects:
        if self._stored is None:
            raise UnavailableError("Stored responses need the session registry, which is not configured.")
        return self._stored

    # -- history ----------------------------------------------------------------------------------------------------

    async def _history(self, body: CreateResponse, owner: str) -> tuple[list[dict], str, str, str | None]:
        """(earlier items, session id, conversation key, conversation id) of what the request continues."""
        if body.previous_response_id and body.conversation:
            raise InvalidRequestError(
                "Mutually exclusive parameters: Ensure you are only providing one of: 'previous_response_id' or "
                "'conversation'.",
                param="conversation",
            )
        if body.previous_response_id:
            history, previous = await self._chain(owner, body.previous_response_id)
            return history, previous.session_id, previous.record.get("conversation_key", ""), None
        if body.conversation:
            conversation_id = body.conversation if isinstance(body.conversation, str) else body.conversation.get("id")
            if not isinstance(conversation_id, str):
                raise InvalidRequestError("Missing required parameter: 'conversation.id'.", param="conversation")
            conversation = await self._conversation(owner, conversation_id)
            items, _ = await self.stored.list_items(owner, CONVERSATION, conversation_id)
            key = conversation.record.get("conversation_key", "")
            return items, conversation.session_id, key, conversation_id
        return [], "", "", None

    async def _chain(self, owner: str, response_id: str) -> tuple[list[dict[str, Any]], Stored]:
        """(the items of a stored response's whole chain, oldest first; the response).

        A stored response holds only its own input and output items and names its previous response, so storage
        grows linearly with a conversation's turns; the chain is walked back through those links, at most
        `limits.max_messages` of them (each adds at least one message). A missing link (a response deleted or
        expired) is OpenAI's 400 for an unknown previous response, naming it.
        """
        segments: list[list[dict[str, Any]]] = []
        newest: Stored | None = None
        link: str | None = response_id
        for _ in range(self._limits.max_messages):
            try:
                stored = await self.stored.get(owner, RESPONSE, link)
            except NotFoundError:
                raise InvalidRequestError(
                    f"Previous response with id '{link}' not found.",
                    param="previous_response_id",
                    code="previous_response_not_found",
                ) from None
            newest = newest or stored
            record = stored.record
            if "input" not in record:  # stored before responses were linked: nothing to continue from
                raise InvalidRequestError(
                    f"Previous response with id '{link}' not found.",
                    param="previous_response_id",
                    code="previous_response_not_found",
                )
            own = _own_items(record)
            segments.append(own)
            if record.get("conversation_id"):  # its history is the conversation's items before its own
                segments.append(await self._conversation_before(owner, record["conversation_id"], own))
                break
            link = record["response"].get("previous_response_id")
            if not link:
                break
        else:
            raise InvalidRequestError(
                f"The chain of previous responses is longer than {self._limits.max_messages} responses.",
                param="previous_response_id",
            )
        assert newest is not None
        return [item for segment in reversed(segments) for item in segment], newest

    async def _conversation_before(self, owner: str, conversation_id: str, own: list[dict]) -> list[dict]:
        """A conversation's items ahead of a response's own items (all of them if those are gone from it)."""
        try:
            items, _ = await self.stored.list_items(owner, CONVERSATION, conversation_id)
        except NotFoundError:
            return []
        ids = [i.get("id") for i in items]
        starts = [ids.index(o["id"]) for o in own if o.get("id") in ids]
        return items[: min(starts)] if starts else items

    async def _conversation(self, owner: str, conversation_id: str):
        try:
            return await self.stored.get(owner, CONVERSATION, conversation_id)
        except NotFoundError:
            raise NotFoundError(
                f"Conversation with id '{conversation_id}' not found.", param="conversation", code="not_found"
            ) from None

    async def _resolve(self, owner: str, item: dict[str, Any], context: list[dict], index: int) -> dict[str, Any]:
        """An `item_reference`, replaced by the item it names (from the history, else from the object that made it)."""
        if item["type"] != "item_reference":
            return item
        reference = item["id"]
        for known in context:
            if known.get("id") == reference:
                return known
        hex_id = it.owner_hex(reference)
        if hex_id is not None and self._stored is not None:
            try:
                record = (await self._stored.get(owner, RESPONSE, "resp_" + hex_id)).record
                for known in _own_items(record):
                    if known.get("id") == reference:
                        return known
            except NotFoundError:
                try:
                    return await self._stored.get_item(owner, CONVERSATION, "conv_" + hex_id, reference)
                except NotFoundError:
                    pass
        raise InvalidRequestError(f"Item with id '{reference}' not found.", param=f"input[{index}].id")

    # -- create ------------------------------------------------------------------------------------------------------

    async def prepare(self, body: CreateResponse, *, request_id: str, api_key_hash: str) -> Plan:
        model = self._catalog.resolve(body.model, Capability.CHAT)
        ignored = apply_policy(RESPONSES, body)
        store = body.store is not False
        if body.background and not store:
            raise InvalidRequestError("Background responses need 'store' to be true.", param="background")
        response_id = f"resp_{uuid.uuid4().hex}"
        context, session_id, key, conversation_id = await self._history(body, api_key_hash)
        input_items = it.normalize_input(body.input, response_id)
        if not input_items and not context:
            raise InvalidRequestError("Missing required parameter: 'input'.", param="input")
        resolved = [await self._resolve(api_key_hash, item, context, i) for i, item in enumerate(input_items)]
        instructions = it.instructions_text(body.instructions)
        messages = it.to_messages(instructions, context + resolved)
        if not messages:
            raise InvalidRequestError("Missing required parameter: 'input'.", param="input")
        request = translate.request_to_proto(
            body, messages, model_id=model.id, request_id=request_id, api_key_hash=api_key_hash, limits=self._limits
        )
        if not key:
            opening = [ChatMessageIn(role=_ROLE_NAMES.get(m.role, "tool"), content=m.content) for m in messages]
            key = conversation_key(opening, body.prompt_cache_key)
        keepalive = body.stream_keepalive_seconds
        job = Prepared(
            id=response_id,
            created=_unix(),
            model=model.id,
            fingerprint=fingerprint(model),
            request=request,
            ignored_params=ignored,
            include_usage=True,
            usage_every_chunk=False,
            ark_metadata=False,
            keepalive_seconds=DEFAULT_KEEPALIVE_SECONDS if keepalive is None else keepalive,
            session_mode="auto",
            conversation_key=key,
        )
        response = Response(
            id=response_id,
            created_at=job.created,
            status="in_progress",
            background=bool(body.background),
            instructions=body.instructions,
            max_output_tokens=body.max_output_tokens,
            max_tool_calls=body.max_tool_calls,
            model=model.id,
            parallel_tool_calls=body.parallel_tool_calls is not False,
            previous_response_id=body.previous_response_id,
            conversation={"id": conversation_id} if conversation_id else None,
            prompt_cache_key=body.prompt_cache_key,
            reasoning={"effort": body.reasoning.get("effort"), "summary": None} if body.reasoning else None,
            safety_identifier=body.safety_identifier,
            store=store,
            temperature=1.0 if body.temperature is None else body.temperature,
            text=body.text or {"format": {"type": "text"}},
            tool_choice=body.tool_choice or "auto",
            tools=_echo_tools(body.tools),
            top_logprobs=body.top_logprobs or 0,
            top_p=1.0 if body.top_p is None else body.top_p,
            truncation=body.truncation or "disabled",
            user=body.user,
            metadata=body.metadata or {},
        )
        return Plan(
            body=body,
            owner=api_key_hash,
            response=response,
            job=job,
            input_items=[i for i in resolved if i["type"] != "item_reference"],
            session_id=session_id,
            conversation_id=conversation_id,
            ignored_params=ignored,
            logprobs=request.sampling.logprobs,
            keepalive_seconds=job.keepalive_seconds,
        )

    async def start(self, plan: Plan) -> Running:
        """Place the generation (on the chain's worker when it continues one) and start it; errors raise here."""
        return await self._chat.start(plan.job, plan.session_id or None)

    # -- events -----------------------------------------------------------------------------------------------------

    async def events(self, plan: Plan, running: Running | None) -> AsyncIterator[Event | None]:
        """The response's events in the spec's order (None: a keep-alive, sent as an SSE comment). The last event
        is `response.completed`, `response.incomplete` or `response.failed`; the response is stored before it."""
        seq = 0

        def numbered(event: Event) -> Event:
            nonlocal seq
            event.sequence_number = seq
            seq += 1
            return event

        response = plan.response
        yield numbered(ResponseEvent(type="response.created", response=response.model_copy(deep=True)))
        response.status = "in_progress"
        yield numbered(ResponseEvent(type="response.in_progress", response=response.model_copy(deep=True)))
        try:
            if running is None:
                running = await self.start(plan)
            async for event in self._generate(plan, running):
                yield event if event is None else numbered(event)
        except ArkError as exc:
            response.status = "failed"
            response.error = ResponseError(code=_failure_code(exc), message=exc.message)
            plan.failure = exc
            log.info("response %s failed: %s", response.id, exc.message)
        except asyncio.CancelledError:
            if running is not None:
                running.stream.cancel()
            raise
        finally:
            if running is not None:
                running.stream.cancel()
        try:
            await self._store(plan, running)
        except ArkError as exc:
            response.status = "failed"
            response.error = ResponseError(code="server_error", message=f"The response could not be stored: {exc}")
        if response.status == "cancelled":
            return  # a cancel won the race with the end: the log ends as for any cancelled response
        final = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(
            response.status, "response.failed"
        )
        yield numbered(ResponseEvent(type=final, response=response))

    async def _generate(self, plan: Plan, running: Running) -> AsyncIterator[Event | None]:
        response = plan.response
        output = response.output
        current: dict[str, Any] | None = None  # the open output item
        calls: dict[int, dict[str, Any]] = {}  # function-call items by the worker's call index
        text: list[str] = []
        logprobs: list[dict[str, Any]] = []

        def close_message(status: str) -> list[Event]:
            nonlocal current
            if current is None or current["type"] != "message":
                return []
            index = len(output) - 1
            full = "".join(text)
            part = {
                "type": "output_text",
                "text": full,
                "annotations": [],
                "logprobs": logprobs if plan.logprobs else [],
            }
            current["content"] = [part]
            current["status"] = status
            done = [
                TextDoneEvent(
                    item_id=current["id"], output_index=index, content_index=0, text=full, logprobs=part["logprobs"]
                ),
                ContentPartEvent(
                    type="response.content_part.done",
                    item_id=current["id"],
                    output_index=index,
                    content_index=0,
                    part=part,
                ),
                OutputItemEvent(type="response.output_item.done", output_index=index, item=dict(current)),
            ]
            current = None
            return done

        def open_message() -> list[Event]:
            nonlocal current
            current = {
                "id": it.item_id("message", response.id, f"{len(output):02d}"),
                "type": "message",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            output.append(current)
            index = len(output) - 1
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            return [
                OutputItemEvent(type="response.output_item.added", output_index=index, item=dict(current, content=[])),
                ContentPartEvent(
                    type="response.content_part.added",
                    item_id=current["id"],
                    output_index=index,
                    content_index=0,
                    part=part,
                ),
            ]

        def close_call(call: dict[str, Any], status: str) -> list[Event]:
            index = output.index(call)
            call["status"] = status
            return [
                ArgumentsDoneEvent(
                    item_id=call["id"], name=call["name"], output_index=index, arguments=call["arguments"]
                ),
                OutputItemEvent(type="response.output_item.done", output_index=index, item=dict(call)),
            ]

        async for message in self._chat._with_keepalive(running.stream, plan.keepalive_seconds):
            if message is None:
                yield None
                continue
            kind = message.WhichOneof("event")
            if kind == "delta":
                d = message.delta
                for c in d.tool_calls:
                    if c.index not in calls:
                        for event in close_message("completed"):
                            yield event
                        for previous in calls.values():
                            if previous["status"] == "in_progress":
                                for event in close_call(previous, "completed"):
                                    yield event
                        call = {
                            "id": it.item_id("function_call", response.id, f"{len(output):02d}"),
                            "type": "function_call",
                            "status": "in_progress",
                            "arguments": "",
                            "call_id": c.id,
                            "name": c.function_name,
                        }
                        calls[c.index] = call
                        output.append(call)
                        yield OutputItemEvent(
                            type="response.output_item.added", output_index=len(output) - 1, item=dict(call)
                        )
                    call = calls[c.index]
                    if c.arguments_delta:
                        call["arguments"] += c.arguments_delta
                        yield ArgumentsDeltaEvent(
                            item_id=call["id"], output_index=output.index(call), delta=c.arguments_delta
                        )
                if d.text and not d.tool_calls:
                    if current is None:
                        for event in open_message():
                            yield event
                    assert current is not None
                    text.append(d.text)
                    new_logprobs = translate.logprobs_to_json(d.logprobs) if plan.logprobs else []
                    logprobs.extend(new_logprobs)
                    yield TextDeltaEvent(
                        item_id=current["id"],
                        output_index=len(output) - 1,
                        content_index=0,
                        delta=d.text,
                        logprobs=translate.delta_logprobs(d.logprobs) if plan.logprobs else [],
                    )
            elif kind == "finished":
                f = message.finished
                cut = FINISH_REASONS.get(f.finish_reason) == "length"
                status = "incomplete" if cut else "completed"
                if not output:
                    for event in open_message():
                        yield event
                for event in close_message(status):
                    yield event
                for call in calls.values():
                    if call["status"] == "in_progress":
                        for event in close_call(call, status):
                            yield event
                response.status = status
                if cut:
                    response.incomplete_details = IncompleteDetails(reason="max_output_tokens")
                else:
                    response.completed_at = _unix()
                u = f.usage
                written = u.prompt_tokens - u.cached_tokens if running.session is not None else 0
                response.usage = ResponseUsage(
                    input_tokens=u.prompt_tokens,
                    input_tokens_details=InputTokensDetails(cached_tokens=u.cached_tokens, cache_write_tokens=written),
                    output_tokens=u.completion_tokens,
                    output_tokens_details=OutputTokensDetails(reasoning_tokens=0),
                    total_tokens=u.prompt_tokens + u.completion_tokens,
                )
                plan.output = output
                return
        raise InternalError("The chat worker ended the stream without finishing.")

    async def _store(self, plan: Plan, running: Running | None) -> None:
        """Keep the response (store: true) and append its items to its conversation."""
        if self._stored is None:
            return
        response = plan.response
        session_id = running.session.session_id if running is not None and running.session is not None else ""
        if response.store:
            record = {"response": response.model_dump(mode="json"), **self._links(plan)}
            if response.background:  # created when it was queued; its final status is written once
                assert self.background is not None
                stored = await self.background.transition(
                    plan.owner,
                    response.id,
                    lambda r: None if r["response"]["status"] in TERMINAL else record,
                    session_id=session_id,
                )
                if stored.record["response"]["status"] == "cancelled":
                    response.status = "cancelled"  # a cancel came first: the end is not stored
                    return
            else:
                items = [(i["id"], i) for i in plan.input_items]
                await self._stored.create(plan.owner, RESPONSE, response.id, record, session_id=session_id, items=items)
        if plan.conversation_id:
            new = [(i["id"], i) for i in plan.input_items + response.output]
            await self._stored.append_items(plan.owner, CONVERSATION, plan.conversation_id, new)
            conversation = await self._stored.get(plan.owner, CONVERSATION, plan.conversation_id)
            if conversation.session_id != session_id or not conversation.record.get("conversation_key"):
                record = {**conversation.record, "conversation_key": plan.job.conversation_key}
                await self._stored.update(plan.owner, CONVERSATION, plan.conversation_id, record, session_id=session_id)

    @staticmethod
    def _links(plan: Plan) -> dict[str, Any]:
        """What a stored response keeps beside its body for continuations: its own input (the output is in the
        body), the conversation key its state runs under, and its conversation (the previous response is in the
        body); never the history (instructions are never carried over either)."""
        links: dict[str, Any] = {"input": plan.input_items, "conversation_key": plan.job.conversation_key}
        if plan.conversation_id:
            links["conversation_id"] = plan.conversation_id
        return links

    async def complete(self, plan: Plan, running: Running, receive: Receive) -> Response | None:
        """Run to the end; the final Response (a failure after start raises, as a JSON error body), or None when
        the client went away first: then the generation is cancelled on its worker and nothing is stored."""
        final = await unless_disconnected(self._final(plan, running), receive, running.stream.cancel)
        if final is None:
            log.info("response %s: the client went away; generation cancelled", plan.response.id)
            return None
        if plan.failure is not None:
            raise plan.failure
        if final.status == "failed" and final.error is not None:
            raise InternalError(final.error.message)
        return final

    async def _final(self, plan: Plan, running: Running) -> Response:
        final: Response | None = None
        async for event in self.events(plan, running):
            if isinstance(event, ResponseEvent):
                final = event.response
        assert final is not None
        return final

    # -- stored responses -------------------------------------------------------------------------------------------

    async def begin_background(self, plan: Plan) -> Response:
        """Store the response `queued` and run it on this edge; returns the queued response."""
        assert self.background is not None
        plan.response.status = "queued"
        record = {"response": plan.response.model_dump(mode="json"), **self._links(plan)}
        items = [(i["id"], i) for i in plan.input_items]
        await self.background.begin(plan.owner, plan.response, record, items)
        queued = plan.response.model_copy(deep=True)
        self.background.run(plan.owner, plan.response.id, lambda: self.events(plan, None))
        return queued

    def replay(self, owner: str, response_id: str, starting_after: int | None) -> AsyncIterator[dict[str, Any]]:
        assert self.background is not None
        return self.background.replay(owner, response_id, starting_after)

    async def retrieve(self, owner: str, response_id: str) -> Response:
        record = await self._response(owner, response_id)
        return Response.model_validate(record.record["response"])

    async def _response(self, owner: str, response_id: str):
        try:
            if self.background is not None:
                return await self.background.current(owner, response_id)
            return await self.stored.get(owner, RESPONSE, response_id)
        except NotFoundError:
            raise NotFoundError(
                f"Response with id '{response_id}' not found.", param="response_id", code="not_found"
            ) from None

    async def delete(self, owner: str, response_id: str) -> None:
        stored = await self._response(owner, response_id)
        await self.stored.delete(owner, RESPONSE, response_id)
        if stored.record["response"].get("background"):
            with contextlib.suppress(NotFoundError):
                await self.stored.delete(owner, RESPONSE_EVENTS, response_id)

    async def cancel(self, owner: str, response_id: str) -> Response:
        record = await self._response(owner, response_id)
        response = Response.model_validate(record.record["response"])
        if not response.background:
            raise InvalidRequestError("Only responses created with background=true can be cancelled.")
        assert self.background is not None
        found: list[str] = []

        def cancel(current: dict[str, Any]) -> dict[str, Any] | None:
            found.append(current["response"]["status"])
            if found[-1] in TERMINAL:
                return None
            return {**current, "response": {**current["response"], "status": "cancelled"}}

        # The edge running it reads this within a heartbeat and aborts the generation on its worker; written as a
        # compare-and-set, so a response that has just ended is reported ended, never turned into cancelled.
        stored = await self.background.transition(owner, response_id, cancel)
        if found[-1] in TERMINAL:
            raise InvalidRequestError(f"Cannot cancel a response with status '{found[-1]}'.")
        return Response.model_validate(stored.record["response"])

    async def input_items(
        self, owner: str, response_id: str, *, after: str, limit: int, order: str
    ) -> tuple[list[dict[str, Any]], bool]:
        await self._response(owner, response_id)
        return await self.stored.list_items(
            owner, RESPONSE, response_id, after=after, limit=limit, descending=order == "desc"
        )

    async def count_tokens(self, body: CreateResponse, *, request_id: str, api_key_hash: str) -> int:
        """Input tokens of a request as the worker renders it: the prompt is computed, nothing is generated."""
        body = body.model_copy(update={"max_output_tokens": 1, "store": False, "background": None, "stream": None})
        plan = await self.prepare(body, request_id=request_id, api_key_hash=api_key_hash)
        running = await self._chat.start(dataclasses.replace(plan.job, session_mode="none"), None)
        try:
            return running.stream.started.prompt_tokens
        finally:
            running.stream.cancel()
