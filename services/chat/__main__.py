"""`python -m services.chat --address HOST:PORT`: one chat worker serving every chat model in the configuration."""

from __future__ import annotations

import argparse
import asyncio

from services.chat.engines import create_engine
from services.chat.servicer import chat_service
from services.common.config import Capability, load_config
from services.common.server import configure_logging, serve


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", help="configuration file (default: $ARK_CONFIG or deploy/ark.yaml)")
    parser.add_argument("--address", help="listen address (default: the first chat worker in the configuration)")
    args = parser.parse_args()
    configure_logging()
    config = load_config(args.config)
    address = args.address or config.services.chat.workers[0]
    engines = {
        m.id: create_engine(m, max_queue=config.services.chat.max_queue) for m in config.models_for(Capability.CHAT)
    }

    async def close_engines() -> None:
        for engine in engines.values():
            await engine.close()

    await serve([chat_service(engines)], address, on_stop=close_engines)


if __name__ == "__main__":
    asyncio.run(main())
