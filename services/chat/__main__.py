"""`python -m services.chat --address HOST:PORT`: one chat worker serving every chat model in the configuration."""

from __future__ import annotations

import asyncio

from services.chat.engines import create_engine
from services.chat.generator import Generator
from services.chat.metrics import register_generators
from services.chat.registration import keep_lease
from services.chat.servicer import chat_service
from services.common.config import ArkConfig, Capability
from services.common.runner import Built, run_service


async def build(config: ArkConfig, address: str) -> Built:
    generators = {
        m.id: Generator(
            create_engine(m),
            max_queue=config.services.chat.max_queue,
            max_queue_wait=config.limits.max_queue_wait_seconds,
            # Saved conversation states (host memory, then local disk) only matter when sessions keep state.
            sessions=config.sessions if config.sessions.enabled else None,
            constraint_limits=config.limits.structured_output,
        )
        for m in config.models_for(Capability.CHAT)
    }
    register_generators(generators)  # queue depth and resident sessions, for Prometheus

    lease = None
    if config.sessions.enabled:
        lease = asyncio.create_task(
            keep_lease(
                config.services.registry.address,
                address,
                generators,
                config.sessions.worker_lease_seconds,
                token=config.services.internal_token,
            )
        )

    async def close_generators() -> None:
        if lease is not None:
            lease.cancel()
        for generator in generators.values():
            await generator.close()

    admissions = [generator.admission for generator in generators.values()]
    return Built([chat_service(generators)], on_stop=close_generators, admissions=admissions)


if __name__ == "__main__":
    run_service(
        "chat",
        __doc__,
        build,
        address=lambda config: config.services.chat.workers[0],
        address_help="the first chat worker in the configuration",
    )
