"""gRPC glue for ChatService: protos in, domain calls, protos out. No logic of its own."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from ark.chat.v1 import chat_service_pb2 as pb
from ark.chat.v1 import chat_service_pb2_grpc as pb_grpc
from services.chat.domain import (
    Admitted,
    Delta,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    Message,
    ResponseFormat,
    ResponseFormatType,
    Role,
    Sampling,
    Started,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolChoice,
    ToolChoiceMode,
)
from services.chat.generator import Generator
from services.common.errors import InvalidRequestError, ModelNotFoundError
from services.common.server import Service

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ChatService"].full_name

_ROLES = {
    pb.ROLE_SYSTEM: Role.SYSTEM,
    pb.ROLE_DEVELOPER: Role.DEVELOPER,
    pb.ROLE_USER: Role.USER,
    pb.ROLE_ASSISTANT: Role.ASSISTANT,
    pb.ROLE_TOOL: Role.TOOL,
}
_FORMATS = {
    pb.RESPONSE_FORMAT_TYPE_TEXT: ResponseFormatType.TEXT,
    pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT: ResponseFormatType.JSON_OBJECT,
    pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA: ResponseFormatType.JSON_SCHEMA,
}
_TOOL_MODES = {
    pb.TOOL_CHOICE_MODE_AUTO: ToolChoiceMode.AUTO,
    pb.TOOL_CHOICE_MODE_NONE: ToolChoiceMode.NONE,
    pb.TOOL_CHOICE_MODE_REQUIRED: ToolChoiceMode.REQUIRED,
    pb.TOOL_CHOICE_MODE_FUNCTION: ToolChoiceMode.FUNCTION,
}
_FINISH = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.TOOL_CALLS: pb.FINISH_REASON_TOOL_CALLS,
    FinishReason.CONTENT_FILTER: pb.FINISH_REASON_CONTENT_FILTER,
}


def request_from_proto(req: pb.StreamGenerateChatCompletionRequest) -> GenerationRequest:
    messages = []
    for i, m in enumerate(req.messages):
        if m.role not in _ROLES:
            raise InvalidRequestError(f"messages[{i}].role is not set", param=f"messages[{i}].role")
        calls = tuple(ToolCall(c.id, c.function_name, c.arguments_json) for c in m.tool_calls)
        messages.append(Message(_ROLES[m.role], m.content, m.name, calls, m.tool_call_id))
    if not messages:
        raise InvalidRequestError("messages must not be empty", param="messages")
    s = req.sampling
    sampling = Sampling(
        temperature=s.temperature if s.HasField("temperature") else 1.0,
        top_p=s.top_p if s.HasField("top_p") else 1.0,
        max_tokens=s.max_tokens if s.HasField("max_tokens") else None,
        seed=s.seed if s.HasField("seed") else None,
        stop=tuple(s.stop),
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        logit_bias=dict(s.logit_bias),
        logprobs=s.logprobs,
        top_logprobs=s.top_logprobs,
        top_k=s.top_k if s.HasField("top_k") else None,
        min_p=s.min_p if s.HasField("min_p") else None,
        repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else None,
        n=max(1, s.n),
    )
    fmt = req.response_format
    tools = tuple(Tool(t.name, t.description, t.parameters_json) for t in req.tools)
    return GenerationRequest(
        request_id=req.request_id,
        model=req.model,
        messages=tuple(messages),
        sampling=sampling,
        response_format=ResponseFormat(
            _FORMATS.get(fmt.type, ResponseFormatType.TEXT), fmt.json_schema, fmt.schema_name
        ),
        tools=tools,
        tool_choice=ToolChoice(
            _TOOL_MODES.get(req.tool_choice.mode, ToolChoiceMode.AUTO),
            req.tool_choice.function_name,
            tuple(req.tool_choice.allowed_function_names),
        ),
        parallel_tool_calls=req.parallel_tool_calls,
        session_id=req.session.session_id,
        api_key_hash=req.session.api_key_hash,
        idle_timeout=float(req.session.idle_timeout_seconds),
        conversation_key=req.session.conversation_key,
    )


# How long a started generation may have nothing to send before the worker says it is still working on it
# (GenerationWorking); well below the edge's silence deadline (`edge.event_timeout_seconds`, 60 s by default).
WORKING_EVERY_SECONDS = 5.0
_WORKING = pb.StreamGenerateChatCompletionResponse(working=pb.GenerationWorking())
_END = object()


class ChatServicer(pb_grpc.ChatServiceServicer):
    def __init__(self, generators: dict[str, Generator], *, working_every: float = WORKING_EVERY_SECONDS) -> None:
        self._generators = generators
        self._working_every = working_every

    def _generator(self, model: str) -> Generator:
        generator = self._generators.get(model)
        if generator is None:
            raise ModelNotFoundError(model)
        return generator

    async def StreamGenerateChatCompletion(
        self, request: pb.StreamGenerateChatCompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamGenerateChatCompletionResponse]:
        events = self._generator(request.model).generate(request_from_proto(request))
        async for message in _with_working(events, self._working_every):
            yield message

    async def DeleteSessionState(
        self, request: pb.DeleteSessionStateRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteSessionStateResponse:
        existed = False
        for generator in self._generators.values():
            existed |= await generator.drop_session(request.session_id)
        return pb.DeleteSessionStateResponse(existed=existed)

    async def GetWorkerStatus(
        self, request: pb.GetWorkerStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetWorkerStatusResponse:
        statuses = [g.status() for g in self._generators.values()]
        admissions = [g.admission for g in self._generators.values()]
        return pb.GetWorkerStatusResponse(
            models=list(self._generators),
            session_capacity=sum(s.session_capacity for s in statuses),
            resident_sessions=sum(s.resident_sessions for s in statuses),
            queued_requests=sum(s.queued_requests for s in statuses),
            # The edges route new requests by these (edge/clients/worker_load.py).
            running_requests=sum(a.running for a in admissions),
            max_running_requests=sum(a.slots for a in admissions),
        )


async def _with_working(
    events: AsyncIterator[GenerationEvent], every: float
) -> AsyncIterator[pb.StreamGenerateChatCompletionResponse]:
    """The generation's events as messages, and `working` after `every` seconds with nothing else to send, once the
    first event (`admitted`) is out.

    Under load a started request can wait minutes for its first token without anything being wrong: sixteen users
    opening 1,500-token documents within half a minute kept a worker prefilling for over a minute, and the edge,
    hearing nothing for 60 s, took the worker for hung, failed the request as a possible poison pill and stopped
    routing to the worker. The generation runs in a task of its own, which hands its events over one at a time
    (the stream's flow control is kept); a client gone (CancelledError here) or a stream closed cancels it, which
    aborts the engine's work as closing the generation did."""
    handed: asyncio.Queue[object] = asyncio.Queue(maxsize=1)

    async def pump() -> None:
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    await handed.put(event)
        except Exception as exc:  # raised to the stream below, as the generation's own error
            await handed.put(exc)
            return
        await handed.put(_END)

    task = asyncio.create_task(pump())
    started = False
    try:
        while True:
            try:
                async with asyncio.timeout(every if started else None):
                    item = await handed.get()
            except TimeoutError:
                yield _WORKING
                continue
            if item is _END:
                return
            if isinstance(item, Exception):
                raise item
            started = True
            yield _event_to_proto(item)  # type: ignore[arg-type]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _event_to_proto(event: GenerationEvent) -> pb.StreamGenerateChatCompletionResponse:
    if isinstance(event, Admitted):
        return pb.StreamGenerateChatCompletionResponse(
            admitted=pb.GenerationAdmitted(queue_seconds=event.queue_seconds)
        )
    if isinstance(event, Delta):
        return pb.StreamGenerateChatCompletionResponse(
            delta=pb.GenerationDelta(
                choice_index=event.choice_index,
                text=event.text,
                token_ids=event.token_ids,
                logprobs=[
                    pb.PositionLogprobs(sampled=_logprob(p.sampled), top=[_logprob(t) for t in p.top])
                    for p in event.logprobs
                ],
                tool_calls=[
                    pb.ToolCallDelta(
                        index=c.index, id=c.id, function_name=c.function_name, arguments_delta=c.arguments_delta
                    )
                    for c in event.tool_calls
                ],
            )
        )
    if isinstance(event, Started):
        return pb.StreamGenerateChatCompletionResponse(
            started=pb.GenerationStarted(
                prompt_tokens=event.prompt_tokens, cached_tokens=event.cached_tokens, state_tier=event.state_tier
            )
        )
    return pb.StreamGenerateChatCompletionResponse(
        finished=pb.GenerationFinished(
            choice_index=event.choice_index,
            more_choices=event.more_choices,
            finish_reason=_FINISH[event.finish_reason],
            usage=pb.Usage(
                prompt_tokens=event.usage.prompt_tokens,
                completion_tokens=event.usage.completion_tokens,
                cached_tokens=event.usage.cached_tokens,
            ),
            timings=pb.Timings(
                time_to_first_token_seconds=event.timings.time_to_first_token_seconds,
                decode_seconds=event.timings.decode_seconds,
                queue_seconds=event.timings.queue_seconds,
            ),
        )
    )


def _logprob(entry: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(token=entry.token, logprob=entry.logprob, token_bytes=entry.token_bytes)


def chat_service(generators: dict[str, Generator], *, working_every: float = WORKING_EVERY_SECONDS) -> Service:
    servicer = ChatServicer(generators, working_every=working_every)
    return Service(SERVICE_NAME, servicer, pb_grpc.add_ChatServiceServicer_to_server)
