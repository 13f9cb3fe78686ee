"""`python -m services.embeddings --address HOST:PORT`: the embeddings service, serving every embeddings model in the
configuration."""

from __future__ import annotations

from services.common.config import ArkConfig, Capability, ConfigError, engine_settings
from services.common.runner import Built, run_service
from services.embeddings.embedder import Embedder
from services.embeddings.engines import create_engine
from services.embeddings.priority import lower_priority
from services.embeddings.servicer import embeddings_service
from services.embeddings.settings import EmbeddingsSettings


async def build(config: ArkConfig, address: str) -> Built:
    models = config.models_for(Capability.EMBEDDINGS)
    if not models:
        raise ConfigError("models: no model with capability `embeddings` is configured")
    settings: dict[str, EmbeddingsSettings] = {}
    for model in models:
        model_settings = engine_settings(model)
        assert isinstance(model_settings, EmbeddingsSettings)
        settings[model.id] = model_settings
    # Before the engines start their threads, which inherit it.
    lower_priority(max(s.nice for s in settings.values()))
    embedders = {
        model.id: Embedder(create_engine(model, settings[model.id]), settings[model.id], config.limits)
        for model in models
    }

    async def close_embedders() -> None:
        for embedder in embedders.values():
            await embedder.close()

    return Built([embeddings_service(embedders)], on_stop=close_embedders)


if __name__ == "__main__":
    run_service(
        "embeddings",
        __doc__,
        build,
        address=lambda config: config.services.embeddings.address,
        address_help="services.embeddings.address",
    )
