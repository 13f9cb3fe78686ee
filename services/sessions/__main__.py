"""`python -m services.sessions --address HOST:PORT`: the session registry."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging

from services.common.config import load_config
from services.common.server import configure_logging, serve
from services.sessions.registry import Registry
from services.sessions.servicer import registry_service
from services.sessions.store import InMemorySessionStore
from services.sessions.workers import WorkerClients

log = logging.getLogger(__name__)


async def sweep_forever(registry: Registry, interval: float = 1.0) -> None:
    """Expire idle and over-age sessions, freeing their workers' state."""
    while True:
        await asyncio.sleep(interval)
        with contextlib.suppress(Exception):
            expired = await registry.sweep()
            if expired:
                log.info("expired %d session(s)", expired)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", help="configuration file (default: $ARK_CONFIG or deploy/ark.yaml)")
    parser.add_argument("--address", help="listen address (default: services.registry.address)")
    args = parser.parse_args()
    configure_logging()
    config = load_config(args.config)
    workers = WorkerClients()
    registry = Registry(InMemorySessionStore(), config.sessions, on_drop=workers.drop_state)
    sweeper = asyncio.create_task(sweep_forever(registry))

    async def stop() -> None:
        sweeper.cancel()
        await workers.close()

    await serve([registry_service(registry)], args.address or config.services.registry.address, on_stop=stop)


if __name__ == "__main__":
    asyncio.run(main())
