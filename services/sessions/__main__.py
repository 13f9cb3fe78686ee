"""`python -m services.sessions --address HOST:PORT`: the session registry.

With `sessions.store: memory` the registry is the only holder of placement; with a redis:// URL any number of
registries share the store. A store that cannot be reached at start is a start-up error (after a short wait, so a
registry may start alongside its store); at run time an outage is served statelessly and recovers by itself.
"""

from __future__ import annotations

import asyncio
import logging
import time

from services.common.config import ArkConfig, ConfigError, SessionsConfig
from services.common.runner import Built, run_service
from services.sessions.objects import open_object_store
from services.sessions.registry import Registry, sweep_forever
from services.sessions.servicer import registry_service
from services.sessions.store import SessionStore, open_store
from services.sessions.workers import WorkerClients

log = logging.getLogger(__name__)

# How long a starting registry waits for its store before giving up.
STORE_WAIT_SECONDS = 15.0


async def connect(policy: SessionsConfig) -> SessionStore:
    """Open the configured store; a ConfigError naming `sessions.store` when it stays unreachable."""
    store = open_store(policy)
    deadline = time.monotonic() + STORE_WAIT_SECONDS
    while True:
        try:
            await store.ping()
            return store
        except Exception as exc:
            if time.monotonic() > deadline:
                await store.close()
                raise ConfigError(f"sessions.store: {policy.store} is unreachable: {exc}") from None
            await asyncio.sleep(0.5)


async def build(config: ArkConfig, address: str) -> Built:
    store = await connect(config.sessions)
    log.info("session store: %s", config.sessions.store.partition("@")[2] or config.sessions.store)
    workers = WorkerClients(token=config.services.internal_token)
    registry = Registry(store, on_drop=workers.drop_state, objects=open_object_store(config.sessions))
    sweeper = asyncio.create_task(sweep_forever(registry))

    async def stop() -> None:
        sweeper.cancel()
        await workers.close()
        await registry.close()

    return Built([registry_service(registry)], on_stop=stop)


if __name__ == "__main__":
    run_service(
        "sessions",
        __doc__,
        build,
        address=lambda config: config.services.registry.address,
        address_help="services.registry.address",
    )
