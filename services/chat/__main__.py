"""`python -m services.chat --address HOST:PORT`: one chat worker serving every chat model in the configuration."""

from __future__ import annotations

import argparse
import asyncio

from services.chat.engines import create_engine
from services.chat.generator import Generator
from services.chat.registration import keep_lease
from services.chat.servicer import chat_service
from services.chat.state_tiers import StateTiers
from services.common.config import Capability, load_config
from services.common.metrics import register_chat_engines
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
        m.id: Generator(
            create_engine(m),
            max_queue=config.services.chat.max_queue,
            max_queue_wait=config.limits.max_queue_wait_seconds,
            # Saved conversation states (host memory, then local disk) only matter when sessions keep state.
            tiers=StateTiers.from_config(config.sessions, m.id) if config.sessions.enabled else None,
            key_share=config.sessions.key_share,
            constraint_limits=config.limits.structured_output,
        )
        for m in config.models_for(Capability.CHAT)
    }
    register_chat_engines(engines)  # queue depth and resident sessions, for Prometheus

    lease = None
    if config.sessions.enabled:
        lease = asyncio.create_task(
            keep_lease(
                config.services.registry.address,
                address,
                engines,
                config.sessions.worker_lease_seconds,
                token=config.services.internal_token,
            )
        )

    async def close_engines() -> None:
        if lease is not None:
            lease.cancel()
        for engine in engines.values():
            await engine.close()

    # A worker being removed (scale-down, rollout) lets its streams run as long as the edge's drain would.
    await serve(
        [chat_service(engines)],
        address,
        on_stop=close_engines,
        grace_seconds=config.edge.drain_grace_seconds,
        token=config.services.internal_token,
    )


if __name__ == "__main__":
    asyncio.run(main())
