"""`python -m services.<name>`: how every ARK gRPC service starts, fails and stops, in one place.

The four services (chat, embeddings, transcription, sessions) differ only in what they build from the configuration;
`run_service()` gives them the same flags (`--config`, `--address`), the same logging, the same failure (a
configuration error is printed as `<name>: <message naming the field>` without a traceback, exit status 2, as
`ark` does) and the same shutdown (services/common/server.py `serve`, with `edge.drain_grace_seconds` of grace for
calls in flight, so a stream on any service may run as long as the edge's own drain lets it).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from services.common.admission import Admission
from services.common.config import ArkConfig, ConfigError, load_config
from services.common.server import Service, serve
from services.common.startup import configure_logging


@dataclass
class Built:
    """What a service builds from the configuration: its servicers, the admissions whose queued work is refused as
    soon as it starts stopping, and what to close once its calls have ended."""

    services: list[Service]
    on_stop: Callable[[], Awaitable[None]] | None = None
    admissions: list[Admission] = field(default_factory=list)


# Builds a service from the configuration and its listen address, in the running event loop (it may start tasks).
Build = Callable[[ArkConfig, str], Awaitable[Built]]


def run_service(
    name: str, description: str, build: Build, address: Callable[[ArkConfig], str], address_help: str
) -> None:
    """Parse the flags, load the configuration, build the service and serve it until SIGTERM; exits the process."""
    parser = argparse.ArgumentParser(prog=f"python -m services.{name}", description=description)
    parser.add_argument("--config", help="configuration file (default: $ARK_CONFIG or deploy/ark.yaml)")
    parser.add_argument("--address", help=f"listen address (default: {address_help})")
    args = parser.parse_args()
    configure_logging()
    try:
        asyncio.run(_run(args.config, args.address, build, address))
    except ConfigError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(0)


async def _run(config_path: str | None, listen: str | None, build: Build, address: Callable[[ArkConfig], str]) -> None:
    config = load_config(config_path)
    listen = listen or address(config)
    built = await build(config, listen)
    await serve(
        built.services,
        listen,
        grace_seconds=config.edge.drain_grace_seconds,
        on_stop=built.on_stop,
        token=config.services.internal_token,
        admissions=built.admissions,
    )
