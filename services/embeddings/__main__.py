"""`python -m services.embeddings --address HOST:PORT`: the embeddings service, serving every embeddings model in the
configuration."""

from __future__ import annotations

import argparse
import asyncio
import sys

from services.common.config import Capability, ConfigError, engine_settings, load_config
from services.common.server import configure_logging, serve
from services.embeddings.embedder import Embedder
from services.embeddings.engines import create_engine
from services.embeddings.servicer import embeddings_service
from services.embeddings.settings import EmbeddingsSettings


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", help="configuration file (default: $ARK_CONFIG or deploy/ark.yaml)")
    parser.add_argument("--address", help="listen address (default: services.embeddings.address)")
    args = parser.parse_args()
    configure_logging()
    try:
        config = load_config(args.config)
        models = config.models_for(Capability.EMBEDDINGS)
        if not models:
            raise ConfigError("no model with capability `embeddings` is configured")
        embedders = {}
        for model in models:
            settings = engine_settings(model)
            assert isinstance(settings, EmbeddingsSettings)
            embedders[model.id] = Embedder(create_engine(model, settings), settings, config.limits)
    except ConfigError as exc:
        print(f"embeddings: {exc}", file=sys.stderr)
        return 2

    async def close_embedders() -> None:
        for embedder in embedders.values():
            await embedder.close()

    address = args.address or config.services.embeddings.address
    await serve([embeddings_service(embedders)], address, on_stop=close_embedders, token=config.services.internal_token)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
