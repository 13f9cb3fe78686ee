"""The edge: OpenAI's HTTP API in front of ARK's gRPC services. `create_app()` only composes parts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from edge.catalog import Catalog
from edge.chat.router import router as chat_router
from edge.chat.serving import ChatCompletions
from edge.clients.chat_workers import ChatWorkers, WorkerPolicy
from edge.clients.embeddings import EmbeddingsBackend
from edge.clients.registry import SessionRegistryClient
from edge.clients.stored_objects import StoredObjects
from edge.clients.transcription import TranscriptionBackend
from edge.conversations.router import router as conversations_router
from edge.conversations.serving import Conversations
from edge.dependencies import EdgeState
from edge.drain import Drain, DrainMiddleware
from edge.embeddings.router import router as embeddings_router
from edge.embeddings.serving import Embeddings
from edge.errors import install_error_handlers
from edge.health import router as health_router
from edge.metrics import MetricsMiddleware
from edge.middleware import (
    UPLOAD_FORM_OVERHEAD_BYTES,
    AuthMiddleware,
    BodyLimitMiddleware,
    LastResortMiddleware,
    RequestIdMiddleware,
)
from edge.models.router import router as models_router
from edge.responses.router import router as responses_router
from edge.responses.serving import Responses
from edge.sessions.placement import SessionPlacer
from edge.sessions.router import router as sessions_router
from edge.transcriptions.router import router as transcriptions_router
from edge.transcriptions.serving import Transcriptions
from services.common.config import ArkConfig, Capability
from services.common.startup import freeze_startup_objects
from services.embeddings.settings import max_inputs_in_service


def create_app(config: ArkConfig, *, drain: Drain | None = None) -> FastAPI:
    """The edge app; `drain` is shared with the server that starts draining on SIGTERM (see edge/drain.py)."""
    if not config.auth.api_keys:
        raise ValueError("auth.api_keys is empty: set ARK_API_KEY or configure a key")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[dict[str, EdgeState]]:
        token = config.services.internal_token  # sent on every call to the services, when configured
        workers = ChatWorkers(config.services.chat.workers, WorkerPolicy.from_config(config.edge), token=token)
        workers.start()  # health probes: failure detection and outlier ejection
        embeddings_backend = EmbeddingsBackend(
            config.services.embeddings.address,
            token=token,
            overload_hold=config.edge.overload_hold_seconds,
            max_inputs={m.id: max_inputs_in_service(m) for m in config.models_for(Capability.EMBEDDINGS)},
        )
        transcription_backend = TranscriptionBackend(config.services.transcription.address, token=token)
        registry = (
            SessionRegistryClient(
                config.services.registry.address, config.sessions.registry_timeout_seconds, token=token
            )
            if config.sessions.enabled
            else None
        )
        sessions = SessionPlacer(registry, config.sessions)
        # Stored responses and conversations are kept by the registry whether or not sessions are enabled.
        stored = StoredObjects(config.services.registry.address, token=token)
        catalog = Catalog(config)
        chat = ChatCompletions(catalog, workers, sessions, config.limits)
        responses = Responses(catalog, chat, stored, config.limits)
        freeze_startup_objects()
        try:
            yield {
                "ark": EdgeState(
                    config=config,
                    catalog=catalog,
                    chat=chat,
                    embeddings=Embeddings(catalog, embeddings_backend, config.limits),
                    sessions=sessions,
                    transcriptions=Transcriptions(catalog, transcription_backend),
                    responses=responses,
                    conversations=Conversations(stored),
                )
            }
        finally:
            await workers.close()
            await embeddings_backend.close()
            await transcription_backend.close()
            if responses.background is not None:
                await responses.background.close()  # running background responses end `failed`
            await stored.close()
            if registry is not None:
                await registry.close()

    app = FastAPI(title="ARK", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_error_handlers(app)
    app.include_router(health_router)
    app.include_router(models_router)
    app.include_router(chat_router)
    app.include_router(embeddings_router)
    app.include_router(sessions_router)
    app.include_router(transcriptions_router)
    app.include_router(responses_router)
    app.include_router(conversations_router)
    # Outermost last: request id wraps everything, so even a 401 or 413 carries one.
    app.add_middleware(AuthMiddleware, api_keys=config.auth.api_keys)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=config.limits.max_body_bytes,
        upload_max_bytes=config.limits.max_audio_bytes + UPLOAD_FORM_OVERHEAD_BYTES,
    )
    # Draining refuses requests before auth or body checks; metrics see every answer, the drain's 503s included.
    app.add_middleware(DrainMiddleware, drain=drain or Drain(config.edge.drain_grace_seconds))
    # Inside the request id and the metrics, so that a 500 for an unexpected exception carries the id and is counted.
    app.add_middleware(LastResortMiddleware)
    app.add_middleware(MetricsMiddleware)
    app.add_middleware(RequestIdMiddleware)
    return app
