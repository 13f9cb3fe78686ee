"""A real ChatService on the embedded SmolLM2 model, in-process on a free port."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from ark.chat.v1 import chat_service_pb2_grpc as chat_grpc
from services.chat.engines import create_engine
from services.chat.generator import Generator
from services.chat.servicer import chat_service
from services.common.config import Capability, load_config
from services.common.server import create_server, mark_serving


@dataclass
class ChatServer:
    address: str
    stub: chat_grpc.ChatServiceStub
    channel: grpc.aio.Channel
    model_id: str


async def start_chat_server(max_queue: int, *, sequences: int | None = None) -> tuple[grpc.aio.Server, ChatServer]:
    """A chat server on the default model; `sequences`: how many it decodes at once (default: the configured)."""
    model = load_config(env={}).models_for(Capability.CHAT)[0]
    if sequences is not None:
        model = model.model_copy(update={"settings": {**model.settings, "n_seq": sequences}})
    service = chat_service({model.id: Generator(create_engine(model), max_queue=max_queue)})
    server, port, health = create_server([service], "127.0.0.1:0")
    await server.start()
    await mark_serving(health, [service.name])
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return server, ChatServer(f"127.0.0.1:{port}", chat_grpc.ChatServiceStub(channel), channel, model.id)


@pytest.fixture(scope="session")
async def chat_server() -> AsyncIterator[ChatServer]:
    server, info = await start_chat_server(max_queue=8)
    yield info
    await info.channel.close()
    await server.stop(None)
