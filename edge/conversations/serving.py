"""Serving logic of /v1/conversations: a conversation is a stored object (kept by the session registry) whose items
are its history; `conversation` on /v1/responses reads them and appends each turn."""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict

from edge.clients.stored_objects import CONVERSATION, StoredObjects
from edge.responses import items as it
from services.common.errors import InvalidRequestError, NotFoundError, UnavailableError

MAX_METADATA_PAIRS = 16


class CreateConversation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None


class UpdateConversation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metadata: dict[str, str]


class CreateItems(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[dict[str, Any]]


class Conversation(BaseModel):
    id: str
    object: str = "conversation"
    created_at: int
    metadata: dict[str, str]


def _metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    metadata = metadata or {}
    if len(metadata) > MAX_METADATA_PAIRS:
        raise InvalidRequestError("metadata holds at most 16 key-value pairs.", param="metadata")
    return metadata


class Conversations:
    def __init__(self, stored: StoredObjects | None) -> None:
        self._stored = stored

    @property
    def stored(self) -> StoredObjects:
        if self._stored is None:
            raise UnavailableError("Conversations need the session registry, which is not configured.")
        return self._stored

    async def _get(self, owner: str, conversation_id: str):
        try:
            return await self.stored.get(owner, CONVERSATION, conversation_id)
        except NotFoundError:
            raise NotFoundError(f"Conversation with id '{conversation_id}' not found.", code="not_found") from None

    async def create(self, owner: str, body: CreateConversation) -> Conversation:
        conversation_id = f"conv_{uuid.uuid4().hex}"
        items = [i for i in it.normalize_input(body.items or [], conversation_id, "items")]
        if any(i["type"] == "item_reference" for i in items):
            raise InvalidRequestError("Item references cannot be added to a conversation.", param="items")
        conversation = Conversation(id=conversation_id, created_at=int(time.time()), metadata=_metadata(body.metadata))
        record = {"conversation": conversation.model_dump(), "conversation_key": ""}
        await self.stored.create(owner, CONVERSATION, conversation_id, record, items=[(i["id"], i) for i in items])
        return conversation

    async def retrieve(self, owner: str, conversation_id: str) -> Conversation:
        return Conversation.model_validate((await self._get(owner, conversation_id)).record["conversation"])

    async def update(self, owner: str, conversation_id: str, body: UpdateConversation) -> Conversation:
        stored = await self._get(owner, conversation_id)
        conversation = Conversation.model_validate(stored.record["conversation"])
        conversation.metadata = _metadata(body.metadata)
        record = {**stored.record, "conversation": conversation.model_dump()}
        await self.stored.update(owner, CONVERSATION, conversation_id, record)
        return conversation

    async def delete(self, owner: str, conversation_id: str) -> None:
        await self._get(owner, conversation_id)
        await self.stored.delete(owner, CONVERSATION, conversation_id)

    async def add_items(self, owner: str, conversation_id: str, body: CreateItems) -> list[dict[str, Any]]:
        await self._get(owner, conversation_id)
        suffix = uuid.uuid4().hex[:6]
        items = it.normalize_input(body.items, conversation_id, "items")
        for i, item in enumerate(items):
            if item["type"] == "item_reference":
                raise InvalidRequestError("Item references cannot be added to a conversation.", param=f"items[{i}]")
            if item["id"].endswith(f"i{i}") and item["id"] != body.items[i].get("id"):
                item["id"] = f"{item['id']}{suffix}"  # unique across calls
        await self.stored.append_items(owner, CONVERSATION, conversation_id, [(i["id"], i) for i in items])
        return items

    async def list_items(
        self, owner: str, conversation_id: str, *, after: str, limit: int, order: str
    ) -> tuple[list[dict[str, Any]], bool]:
        await self._get(owner, conversation_id)
        return await self.stored.list_items(
            owner, CONVERSATION, conversation_id, after=after, limit=limit, descending=order == "desc"
        )

    async def get_item(self, owner: str, conversation_id: str, item_id: str) -> dict[str, Any]:
        await self._get(owner, conversation_id)
        try:
            return await self.stored.get_item(owner, CONVERSATION, conversation_id, item_id)
        except NotFoundError:
            raise NotFoundError(f"Item with id '{item_id}' not found.", code="not_found") from None

    async def delete_item(self, owner: str, conversation_id: str, item_id: str) -> Conversation:
        stored = await self._get(owner, conversation_id)
        try:
            await self.stored.delete_item(owner, CONVERSATION, conversation_id, item_id)
        except NotFoundError:
            raise NotFoundError(f"Item with id '{item_id}' not found.", code="not_found") from None
        return Conversation.model_validate(stored.record["conversation"])
