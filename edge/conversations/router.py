"""HTTP glue for /v1/conversations and their items."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from edge.conversations.serving import Conversations, CreateConversation, CreateItems, UpdateConversation
from edge.dependencies import Ctx, json_body
from edge.responses.schemas import ItemList

router = APIRouter()


async def get_conversations(request: Request) -> Conversations:
    return request.state.ark.conversations


ConversationsDep = Annotated[Conversations, Depends(get_conversations)]


def _page(data: list[dict], more: bool) -> JSONResponse:
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    return JSONResponse(ItemList(data=data, first_id=first, last_id=last, has_more=more).model_dump())


@router.post("/v1/conversations", response_model=None)
async def create_conversation(
    body: Annotated[CreateConversation, json_body(CreateConversation)], ctx: Ctx, conversations: ConversationsDep
) -> JSONResponse:
    return JSONResponse((await conversations.create(ctx.api_key_hash, body)).model_dump())


@router.get("/v1/conversations/{conversation_id}", response_model=None)
async def retrieve_conversation(conversation_id: str, ctx: Ctx, conversations: ConversationsDep) -> JSONResponse:
    return JSONResponse((await conversations.retrieve(ctx.api_key_hash, conversation_id)).model_dump())


@router.post("/v1/conversations/{conversation_id}", response_model=None)
async def update_conversation(
    conversation_id: str,
    body: Annotated[UpdateConversation, json_body(UpdateConversation)],
    ctx: Ctx,
    conversations: ConversationsDep,
) -> JSONResponse:
    return JSONResponse((await conversations.update(ctx.api_key_hash, conversation_id, body)).model_dump())


@router.delete("/v1/conversations/{conversation_id}", response_model=None)
async def delete_conversation(conversation_id: str, ctx: Ctx, conversations: ConversationsDep) -> JSONResponse:
    await conversations.delete(ctx.api_key_hash, conversation_id)
    return JSONResponse({"id": conversation_id, "object": "conversation.deleted", "deleted": True})


@router.post("/v1/conversations/{conversation_id}/items", response_model=None)
async def create_items(
    conversation_id: str,
    body: Annotated[CreateItems, json_body(CreateItems)],
    ctx: Ctx,
    conversations: ConversationsDep,
) -> JSONResponse:
    return _page(await conversations.add_items(ctx.api_key_hash, conversation_id, body), False)


@router.get("/v1/conversations/{conversation_id}/items", response_model=None)
async def list_items(
    conversation_id: str,
    ctx: Ctx,
    conversations: ConversationsDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
    after: str = "",
) -> JSONResponse:
    data, more = await conversations.list_items(
        ctx.api_key_hash, conversation_id, after=after, limit=limit, order=order
    )
    return _page(data, more)


@router.get("/v1/conversations/{conversation_id}/items/{item_id}", response_model=None)
async def get_item(conversation_id: str, item_id: str, ctx: Ctx, conversations: ConversationsDep) -> JSONResponse:
    return JSONResponse(await conversations.get_item(ctx.api_key_hash, conversation_id, item_id))


@router.delete("/v1/conversations/{conversation_id}/items/{item_id}", response_model=None)
async def delete_item(conversation_id: str, item_id: str, ctx: Ctx, conversations: ConversationsDep) -> JSONResponse:
    return JSONResponse((await conversations.delete_item(ctx.api_key_hash, conversation_id, item_id)).model_dump())
