"""HTTP glue for /v1/responses."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from edge import sse
from edge.dependencies import Ctx, json_body
from edge.responses.schemas import CreateResponse, DeletedResponse, InputTokensRequest, ItemList, TokenCounts
from edge.responses.serving import Plan, Responses
from services.common.errors import InvalidRequestError

router = APIRouter()


async def get_responses(request: Request) -> Responses:
    return request.state.ark.responses


ResponsesDep = Annotated[Responses, Depends(get_responses)]


async def _sse(responses: Responses, plan: Plan, running):
    async for event in responses.events(plan, running):
        yield sse.KEEPALIVE if event is None else sse.frame(event, event=event.type)


@router.post("/v1/responses", response_model=None)
async def create_response(
    request: Request, body: Annotated[CreateResponse, json_body(CreateResponse)], ctx: Ctx, responses: ResponsesDep
) -> Response:
    plan = await responses.prepare(body, request_id=ctx.request_id, api_key_hash=ctx.api_key_hash)
    headers = {"x-ark-ignored-params": ",".join(plan.ignored_params)} if plan.ignored_params else {}
    if body.background:
        queued = await responses.begin_background(plan)
        if body.stream:
            events = _replay(responses, ctx.api_key_hash, queued.id, None)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers | sse.HEADERS)
        return JSONResponse(queued.model_dump(mode="json"), headers=headers)
    running = await responses.start(plan)
    if body.stream:
        return StreamingResponse(
            _sse(responses, plan, running), media_type="text/event-stream", headers=headers | sse.HEADERS
        )
    final = await responses.complete(plan, running, request.receive)
    if final is None:  # the client went away: nobody reads this
        return Response(status_code=499)
    return JSONResponse(final.model_dump(mode="json"), headers=headers)


@router.post("/v1/responses/input_tokens", response_model=None)
async def count_input_tokens(
    body: Annotated[InputTokensRequest, json_body(InputTokensRequest)], ctx: Ctx, responses: ResponsesDep
) -> JSONResponse:
    model = body.model or responses.default_model()
    create = CreateResponse.model_validate({**body.model_dump(exclude_none=True), "model": model})
    tokens = await responses.count_tokens(create, request_id=ctx.request_id, api_key_hash=ctx.api_key_hash)
    return JSONResponse(TokenCounts(input_tokens=tokens).model_dump())


async def _replay(responses: Responses, owner: str, response_id: str, starting_after: int | None):
    async for event in responses.replay(owner, response_id, starting_after):
        yield sse.frame(event, event=event["type"])


@router.get("/v1/responses/{response_id}", response_model=None)
async def retrieve_response(
    response_id: str,
    ctx: Ctx,
    responses: ResponsesDep,
    stream: bool = False,
    starting_after: Annotated[int | None, Query(ge=-1)] = None,
) -> Response:
    """The stored response; with `stream=true`, its events after `starting_after` (background responses)."""
    response = await responses.retrieve(ctx.api_key_hash, response_id)
    if stream:
        if not response.background:
            raise InvalidRequestError("Only background responses can be streamed again.", param="stream")
        events = _replay(responses, ctx.api_key_hash, response_id, starting_after)
        return StreamingResponse(events, media_type="text/event-stream", headers=sse.HEADERS)
    return JSONResponse(response.model_dump(mode="json"))


@router.delete("/v1/responses/{response_id}", response_model=None)
async def delete_response(response_id: str, ctx: Ctx, responses: ResponsesDep) -> JSONResponse:
    await responses.delete(ctx.api_key_hash, response_id)
    return JSONResponse(DeletedResponse(id=response_id).model_dump())


@router.post("/v1/responses/{response_id}/cancel", response_model=None)
async def cancel_response(response_id: str, ctx: Ctx, responses: ResponsesDep) -> JSONResponse:
    return JSONResponse((await responses.cancel(ctx.api_key_hash, response_id)).model_dump(mode="json"))


@router.get("/v1/responses/{response_id}/input_items", response_model=None)
async def list_input_items(
    response_id: str,
    ctx: Ctx,
    responses: ResponsesDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
    after: str = "",
) -> JSONResponse:
    data, more = await responses.input_items(ctx.api_key_hash, response_id, after=after, limit=limit, order=order)
    page = ItemList(
        data=data, first_id=data[0]["id"] if data else None, last_id=data[-1]["id"] if data else None, has_more=more
    )
    return JSONResponse(page.model_dump())
